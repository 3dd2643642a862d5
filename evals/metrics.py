"""Scoring functions: pure Python on strings and numbers (no model, no torch), so each is checked by hand.

- `normalize_answer` / `exact_match`: SQuAD-style answer normalisation, max over gold aliases (TriviaQA).
- `first_answer_span`: the part of a generated answer before the first newline / period / comma (lm-eval's
  TriviaQA stop strings).
- `rouge_scores`: ROUGE-1/2/L F-measure x 100 with `rouge-score` (ROCStories infilling, as the paper).
- `gsm8k_gold` / `gsm8k_prediction` / `numbers_equal`: GSM8K final-answer parsing (the symbolic solution form
  training shares: `dlm.formats`).
- `mean_stderr`: mean and standard error of per-example values (accuracy, ROUGE, pass@1 ...).
- `wilson_interval` / `bootstrap_interval`: 95% intervals: Wilson score for a proportion (accuracy, exact match,
  pass@1), seeded percentile bootstrap for a mean or any statistic of the examples (ROUGE, perplexity ...).
- `distinct_n`: fraction of unique n-grams in a text (diversity of generations).
"""
from __future__ import annotations

import math
import re
import string
from functools import lru_cache
from typing import Iterable, Optional, Sequence

from dlm.formats import GSM8K_FORMATS, gsm8k_symbolic  # noqa: F401  (shared with training; re-exported)

# ----- exact match (TriviaQA) ----------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop articles (a/an/the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, aliases: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals the normalised form of any alias, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in aliases))


def first_answer_span(text: str, stops: Sequence[str] = ("\n", ".", ",")) -> str:
    """Cut a generated short answer at the first stop string (lm-eval's TriviaQA `until`), then strip."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


# ----- ROUGE (ROCStories infilling) ------------------------------------------------------------------------------
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measure of `prediction` against `reference`, scaled to 0..100 (the paper's Table 1 units)."""
    scores = _rouge_scorer().score(reference, prediction)
    return {k: 100.0 * scores[k].fmeasure for k in ROUGE_TYPES}


# ----- GSM8K -------------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _clean_number(text: str) -> Optional[str]:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_gold(answer: str) -> str:
    """The reference answer: what follows '####' in a GSM8K solution, as a canonical number string."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer[-80:]!r}")
    tail = answer.split("####")[-1].strip()
    cleaned = _clean_number(tail)
    return cleaned if cleaned is not None else tail


GSM8K_STOP = "Question:"   # lm-eval's stop for GSM8K too


def gsm8k_prediction(text: str) -> Optional[str]:
    """The model's final answer: the first number after the last '####' if there is one, else the last number in
    the text; canonical number string ("1,000.00" -> "1000"), None when the text holds no number. Text from the
    first "Question:" on is not read: a model that goes on to pose the next problem (few-shot prompts invite it)
    would otherwise be scored on that problem's numbers."""
    text = text.split(GSM8K_STOP)[0]
    if "####" in text:
        after = _NUMBER.findall(text.split("####")[-1])
        if after:
            return _clean_number(after[0])
    found = _NUMBER.findall(text)
    return _clean_number(found[-1]) if found else None


def numbers_equal(a: Optional[str], b: Optional[str], tol: float = 1e-6) -> bool:
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=tol)
    except ValueError:
        return a.strip() == b.strip()


# ----- aggregation -------------------------------------------------------------------------------------------------
def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, std(ddof=1)/sqrt(n) (lm-eval's convention); stderr NaN when n < 2."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


# ----- 95% intervals ------------------------------------------------------------------------------------------------
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def _z(level: float) -> float:
    from statistics import NormalDist
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: float, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (Wilson 1927; what statsmodels' proportion_confint and
    scipy's binomtest(...).proportion_ci call "wilson"). Unlike mean +- 1.96 se it stays inside [0, 1] and is not
    zero-width at 0 / n or n / n. (nan, nan) when n == 0."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..n ({n}), got {successes}")
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values, statistic=None, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over examples, deterministic for `seed`.

    values:    per-example values, a sequence of numbers or of equal-length rows (e.g. (nll, n_tokens) pairs for a
               corpus perplexity): examples are resampled with replacement as whole rows.
    statistic: rows (numpy array, resampled) -> float; default the mean of a 1-D array.
    (nan, nan) with fewer than 2 examples.
    """
    import numpy as np
    data = np.asarray(values, dtype=np.float64)
    n = len(data)
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))                        # [resamples, n]
    if statistic is None:
        if data.ndim != 1:
            raise ValueError("bootstrap_interval: rows of values need a statistic")
        stats = data[idx].mean(axis=1)
    else:
        stats = np.array([statistic(data[i]) for i in idx])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mcnemar_exact(b_only: int, a_only: int) -> float:
    """Two-sided exact McNemar p-value: of the examples exactly one model gets right, is the split b_only : a_only
    consistent with a fair coin? (the binomial test on the discordant pairs; 1.0 when there are none)."""
    n = b_only + a_only
    if n == 0:
        return 1.0
    k = min(b_only, a_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_proportion_interval(both: int, a_only: int, b_only: int, neither: int,
                               level: float = CI_LEVEL) -> tuple[float, float]:
    """Interval for the difference of two paired proportions, B - A, from the 2x2 counts of examples (Newcombe
    1998, "Improved confidence intervals for the difference between binomial proportions based on paired data",
    method 10): each model's Wilson interval, combined with the correlation phi of the pairs. Unlike a bootstrap
    it keeps its coverage when only a few examples are discordant, and like Wilson it stays inside [-1, 1]."""
    n = both + a_only + b_only + neither
    if n <= 0:
        return float("nan"), float("nan")
    pa, pb = (both + a_only) / n, (both + b_only) / n
    la, ua = wilson_interval(both + a_only, n, level)
    lb, ub = wilson_interval(both + b_only, n, level)
    den = math.sqrt((both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither))
    phi = (both * neither - a_only * b_only) / den if den > 0 else 0.0
    d = pb - pa
    lower = d - math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    upper = d + math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = BOOTSTRAP_SEED) -> dict:
    """B - A on the same examples (per-example scores in the same order): each mean and the mean difference with
    a 95% interval for it that uses the pairing, so what is easy or hard for both cancels. 0/1 scores (accuracy,
    exact match, pass@1) get Newcombe's paired score interval (`paired_proportion_interval`), the discordant
    counts (`b_only`: B right and A wrong; `a_only`) and the exact McNemar p-value; other scores (ROUGE) a
    percentile bootstrap that resamples examples as pairs."""
    import numpy as np
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} scores against {len(b)}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    nan = float("nan")
    out = {"n": len(x), "a": float(x.mean()) if len(x) else nan, "b": float(y.mean()) if len(y) else nan,
           "diff": float((y - x).mean()) if len(x) else nan}
    if len(x) and set(np.unique(np.concatenate([x, y]))) <= {0.0, 1.0}:
        both, neither = int(((x == 1) & (y == 1)).sum()), int(((x == 0) & (y == 0)).sum())
        out["b_only"], out["a_only"] = int(((y == 1) & (x == 0)).sum()), int(((x == 1) & (y == 0)).sum())
        out["ci"] = list(paired_proportion_interval(both, out["a_only"], out["b_only"], neither))
        out["ci_method"] = "newcombe-paired"
        out["p_mcnemar"] = mcnemar_exact(out["b_only"], out["a_only"])
    else:
        out["ci"], out["ci_method"] = list(bootstrap_interval(y - x, seed=seed)), BOOTSTRAP_PAIRED
    return out


BOOTSTRAP_PAIRED = f"paired percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}"


# ----- diversity -----------------------------------------------------------------------------------------------------
from dlm.quality import distinct_n  # noqa: E402,F401  (one definition for the app, evals and bench)
