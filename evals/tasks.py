"""The tasks: for each, how to load its examples, how to turn one example into a prediction record, and which
per-example numbers become the task's metrics.

A record is a JSON-able dict with the example `id`, what the model produced and one number per metric; the run
appends it to `predictions/<task>.jsonl` as soon as it exists (that is what makes runs resumable), and `aggregate`
turns the records into `{"<metric>": mean, "<metric>_stderr": se, "<metric>_ci": [lo, hi], "stderr": se(main),
"ci": ci(main), "ci_method": {...}, "n": n}`: 95% intervals, Wilson for proportions (`PROPORTION_METRICS`), a
seeded percentile bootstrap over examples for everything else (ROUGE, perplexities, distinct-2).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from dlm.quality import judge_nll

from . import data as D
from .eval_model import EvalModel, example_seed
from .execution import humaneval_program, run_program, single_line
from .metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    bootstrap_interval,
    distinct_n,
    exact_match,
    first_answer_span,
    gsm8k_prediction,
    mean_stderr,
    normalize_answer,
    numbers_equal,
    rouge_scores,
    wilson_interval,
)

# Per-example 0/1 metrics: their mean is a proportion, shown in % with a Wilson interval.
PROPORTION_METRICS = frozenset({"acc", "acc_norm", "em", "pass@1"})
BOOTSTRAP = f"bootstrap (percentile, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str                               # column header in the Table-1 layout
    load: Callable                           # (data_dir, backend settings) -> list of examples
    evaluate: Callable                       # (backend, example) -> record dict
    metrics: tuple[str, ...]                 # per-example keys averaged into the results
    main: str                                # the metric shown in the table and whose stderr is "stderr"
    aggregate: Optional[Callable] = None     # custom (records -> results) for corpus-level metrics
    rescore: Optional[Callable] = None       # record -> the record with its answer read again from its stored text
    default_new_tokens: int = 32             # answer budget when the length is not the oracle's
    description: str = ""
    extra: dict = field(default_factory=dict)


# ----- multiple choice ------------------------------------------------------------------------------------------------
def eval_mc(b: EvalModel, ex: D.MCExample) -> dict:
    """acc: argmax of the summed log-likelihood; acc_norm: of log-likelihood per UTF-8 byte of the choice (lm-eval).
    Under the DLM 'paper' estimator the score is already a per-token mean, so acc_norm is not computed."""
    lls = b.loglikelihoods(list(zip(ex.contexts, ex.continuations)), seed=example_seed(b.s.seed, ex.id))
    scores = [ll.logprob for ll in lls]
    pred = max(range(len(scores)), key=scores.__getitem__)
    rec = {"id": ex.id, "gold": ex.gold, "pred": pred, "logprobs": scores, "acc": float(pred == ex.gold)}
    if any(ll.stderr for ll in lls):
        rec["stderrs"] = [ll.stderr for ll in lls]
    same_continuation = len(set(ex.continuations)) == 1
    if not same_continuation and not (b.kind == "dlm" and b.s.score_method == "paper"):
        norm = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, ex.continuations)]
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        rec.update(pred_norm=pred_norm, acc_norm=float(pred_norm == ex.gold))
    return rec


# ----- LAMBADA --------------------------------------------------------------------------------------------------------
_WORD_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def first_word(text: str) -> str:
    words = text.split()
    return _WORD_EDGE_PUNCT.sub("", words[0]) if words else ""


def eval_lastword(b: EvalModel, ex: D.LastWordExample) -> dict:
    """Oracle length: AR = greedy decoding reproduces the target's tokens (lm-eval's lambada acc), DLM = the
    target's number of tokens generated after the context (the paper's infilling of the last word) equals it.
    Not oracle: the first word of a free continuation of `max_new_tokens` (default 8) equals the target word."""
    seed = example_seed(b.s.seed, ex.id)
    target = ex.target.strip()
    rec: dict = {"id": ex.id, "target": target}
    if b.kind == "ar":
        ll = b.loglikelihoods([(ex.context, ex.target)], seed)[0]
        rec["logprob"] = ll.logprob
    if b.s.oracle_length:
        if b.kind == "ar":
            rec.update(pred=None, acc=float(ll.greedy))
        else:
            g = b.complete(ex.context, b.n_tokens(ex.target), seed)
            rec.update(pred=g.text.strip(), acc=float(g.text.strip() == target))
    else:
        g = b.complete(ex.context, b.s.max_new_tokens or 8, seed)
        rec.update(pred=first_word(g.text), acc=float(first_word(g.text) == _WORD_EDGE_PUNCT.sub("", target)))
    return rec


def aggregate_lastword(records: list[dict], main: str) -> dict:
    out = aggregate_mean(records, ("acc",), main)
    lps = [r["logprob"] for r in records if r.get("logprob") is not None]
    if lps:  # lm-eval's lambada perplexity: exp(-mean log-likelihood of the target)
        out["ppl"] = math.exp(-sum(lps) / len(lps))
        out["ppl_ci"] = list(bootstrap_interval(lps, lambda v: math.exp(-v.mean())))
        out["ci_method"]["ppl"] = BOOTSTRAP
    return out


# ----- TriviaQA -------------------------------------------------------------------------------------------------------
def answers(b: EvalModel, prompt, n: int, seed: int, extract, messages=None) -> tuple[Optional[str], list[str]]:
    """The answer to `prompt` -> (answer, raw texts): one greedy generation, or with `samples` > 1 the paper's
    self-consistency: that many sampled generations (temperature `sample_temperature`, top-p 0.95, seeds
    seed..seed+k-1), `extract`ed and normalised, the most frequent answer winning (ties: the first sampled)."""
    if b.s.samples <= 1:
        text = b.complete(prompt, n, seed, messages=messages).text
        return extract(text), [text]
    texts = [b.complete(prompt, n, seed + j, temperature=b.s.sample_temperature, top_p=0.95, messages=messages).text
             for j in range(b.s.samples)]
    return majority([extract(t) for t in texts]), texts


def majority(preds: list[Optional[str]]) -> Optional[str]:
    """Self-consistency's vote: the most frequent answer after normalisation (ties: the first given); answers that
    are None or empty do not vote; with no votes, the first answer."""
    votes = Counter(normalize_answer(p) for p in preds if p)
    if not votes:
        return preds[0]
    best = max(votes.values())
    return next(p for p in preds if p and votes[normalize_answer(p)] == best)


def eval_qa(b: EvalModel, ex: D.QAExample) -> dict:
    """Greedy answer (oracle: as many tokens as the first alias), cut at the first newline / '.' / ',', exact match
    over the aliases after SQuAD normalisation; `shots` solved questions before it, `samples` for
    self-consistency (`answers`)."""
    n = b.n_tokens(" " + ex.answer) if b.s.oracle_length else (b.s.max_new_tokens or 24)
    pred, raw = answers(b, ex.prompt, n, example_seed(b.s.seed, ex.id), first_answer_span)
    return {"id": ex.id, "pred": pred, "raw": raw[0] if len(raw) == 1 else raw, "answer": ex.answer,
            "em": exact_match(pred, ex.aliases)}


# ----- ROCStories -----------------------------------------------------------------------------------------------------
def eval_story_infill(b: EvalModel, ex: D.InfillExample) -> dict:
    """Sentence 3 from sentences 1-2 and 4-5 (DLM) or from 1-2 only (AR); ROUGE-1/2/L F1 x 100 against the
    reference. Oracle: the reference's number of tokens; else `max_new_tokens` (default 24). The prediction is
    cut at the first newline."""
    n = b.n_tokens(ex.target) if b.s.oracle_length else (b.s.max_new_tokens or 24)
    middle = b.infill(ex.prefix, ex.suffix, n, example_seed(b.s.seed, ex.id))
    pred = middle.split("\n")[0].strip()
    return {"id": ex.id, "pred": pred, "target": ex.target.strip(), **rouge_scores(pred, ex.target.strip())}


# ----- HumanEval single-line infilling --------------------------------------------------------------------------------
def eval_code_infill(b: EvalModel, ex: D.InfillExample) -> dict:
    """Middle line from prefix + suffix (DLM) or the prefix alone (AR), cut after its first newline, then the
    task's unit tests run in a sandboxed subprocess (`evals.execution`): pass@1 with one greedy sample.
    Oracle: the canonical line's number of tokens; else `max_new_tokens` (default 32)."""
    n = b.n_tokens(ex.target) if b.s.oracle_length else (b.s.max_new_tokens or 32)
    completion = single_line(b.infill(ex.prefix, ex.suffix, n, example_seed(b.s.seed, ex.id)))
    result = run_program(humaneval_program(ex.prefix, completion, ex.suffix, ex.meta["test"], ex.meta["entry_point"]),
                         timeout=b.s.exec_timeout)
    return {"id": ex.id, "task_id": ex.meta["task_id"], "completion": completion, "status": result.status,
            "detail": result.detail, "pass@1": float(result.passed)}


# ----- GSM8K ----------------------------------------------------------------------------------------------------------
def eval_gsm8k(b: EvalModel, ex: D.MathExample) -> dict:
    """The prompt "Question: ...\\nAnswer:" (or the chat template with `chat`) after `shots` solved train
    questions, greedy or `samples` for self-consistency; the final answer is the number after '####' in the output,
    else its last number. Oracle: the reference solution's token count (in the run's `gsm8k_format`)."""
    n = b.n_tokens(" " + ex.solution) if b.s.oracle_length else (b.s.max_new_tokens or 256)
    seed = example_seed(b.s.seed, ex.id)
    if b.s.chat:
        pred, raw = answers(b, None, n, seed, gsm8k_prediction,
                            messages=[{"role": "user", "content": ex.shots + ex.question}])
    else:
        pred, raw = answers(b, f"{ex.shots}Question: {ex.question}\nAnswer:", n, seed, gsm8k_prediction)
    return {"id": ex.id, "pred": pred, "answer": ex.answer, "raw": raw[0] if len(raw) == 1 else raw,
            "acc": float(numbers_equal(pred, ex.answer))}


def rescore_gsm8k(record: dict) -> dict:
    """The record with its answer read again from its stored generations (`raw`: one text, or the samples of
    self-consistency), for when the reading rule changed; the generations themselves are not redone."""
    raw = record["raw"]
    pred = majority([gsm8k_prediction(t) for t in (raw if isinstance(raw, list) else [raw])])
    return {**record, "pred": pred, "acc": float(numbers_equal(pred, record["answer"]))}


# ----- the playground's In-context examples ---------------------------------------------------------------------------
def eval_incontext(b: EvalModel, ex: D.ICLExample) -> dict:
    """The In-context tab's scoreboard as an evaluation: the example's own length and steps over the model's
    writing config (+ --sampler), scored by `dlm.fewshot.run_example`, the function the scoreboard calls (the
    answer = the output's first line, right when the expected answer is a whole word of it). The config's
    temperature stands (the shipped one samples); the seed is the example's."""
    from dlm.fewshot import answer_of, run_example
    e = ex.example
    base = b.model.sampler_config.replace(**b.s.sampler)
    text, ok = run_example(b.model, e, base, b.kind, seed=example_seed(b.s.seed, ex.id))
    return {"id": ex.id, "name": e.name, "expected": e.expected, "pred": answer_of(text), "raw": text,
            "hard": bool(e.hard), "acc": float(ok)}


# ----- held-out perplexity --------------------------------------------------------------------------------------------
def load_ppl(data_dir: Path, s) -> list[D.TextExample]:
    return D.heldout_paragraphs(data_dir, s.heldout_book)


def eval_ppl(b: EvalModel, ex: D.TextExample) -> dict:
    """NLL of the paragraph's first `ppl_max_tokens` tokens after the start token: exact for AR, the ELBO upper
    bound for a DLM (so its perplexity is an upper bound, the paper's reported quantity)."""
    ids = b.tokenizer(ex.text, add_special_tokens=False)["input_ids"][: b.s.ppl_max_tokens]
    nll = b.nll(ids, example_seed(b.s.seed, ex.id))
    return {"id": ex.id, "nll": nll, "n_tokens": len(ids), "nll_per_token": nll / len(ids)}


def aggregate_ppl(records: list[dict], main: str) -> dict:
    """Corpus perplexity exp(sum nll / sum tokens); stderr by the delta method on the per-paragraph NLL/token."""
    total = sum(r["nll"] for r in records)
    tokens = sum(r["n_tokens"] for r in records)
    ppl = math.exp(total / tokens) if tokens else float("nan")
    _, se = mean_stderr([r["nll_per_token"] for r in records])
    ci = list(bootstrap_interval([(r["nll"], r["n_tokens"]) for r in records], _corpus_ppl))
    return {"ppl": ppl, "ppl_stderr": ppl * se, "ppl_ci": ci, "stderr": ppl * se, "ci": ci,
            "ci_method": {"ppl": BOOTSTRAP}, "n": len(records), "tokens": tokens}


def _corpus_ppl(rows) -> float:
    """exp(sum NLL / sum tokens) of (nll, n_tokens) rows: the statistic the perplexity intervals resample."""
    return math.exp(rows[:, 0].sum() / rows[:, 1].sum())


# ----- generation quality ---------------------------------------------------------------------------------------------
def load_genppl(data_dir: Path, s) -> list[D.TextExample]:
    return D.heldout_paragraphs(data_dir, s.heldout_book)


def eval_genppl(b: EvalModel, ex: D.TextExample, length: int) -> dict:
    """Sample `length` tokens (unconditionally from the start token, or after the first `gen_prompt_words` words of
    a held-out paragraph) at `gen_temperature` / `gen_top_p`; score the text with the AR judge; distinct-2."""
    seed = example_seed(b.s.seed, ex.id)
    prompt_text = " ".join(ex.text.split()[: b.s.gen_prompt_words])
    prompt = prompt_text if prompt_text else [b.start_token()]
    g = b.complete(prompt, length, seed, temperature=b.s.gen_temperature, top_p=b.s.gen_top_p)
    text = g.text
    rec = {"id": ex.id, "prompt": prompt_text, "text": text, "distinct2": distinct_n(text, 2), "nll": 0.0,
           "n_tokens": 0}
    if text.strip():
        nll, n_tokens = judge_nll(b.judge(), prompt_text, text)
        rec.update(nll=nll, n_tokens=n_tokens)
    if math.isnan(rec["distinct2"]):
        rec["distinct2"] = None
    return rec


def aggregate_genppl(records: list[dict], main: str) -> dict:
    """gen_ppl = exp(sum judge NLL / sum judge tokens) over all samples; distinct2 = mean over samples."""
    scored = [r for r in records if r["n_tokens"] > 0]
    tokens = sum(r["n_tokens"] for r in scored)
    ppl = math.exp(sum(r["nll"] for r in scored) / tokens) if tokens else float("nan")
    _, se = mean_stderr([r["nll"] / r["n_tokens"] for r in scored])
    d2_values = [r["distinct2"] for r in records if r.get("distinct2") is not None]
    d2, d2_se = mean_stderr(d2_values)
    ci = list(bootstrap_interval([(r["nll"], r["n_tokens"]) for r in scored], _corpus_ppl))
    return {"gen_ppl": ppl, "gen_ppl_stderr": ppl * se, "gen_ppl_ci": ci, "distinct2": d2, "distinct2_stderr": d2_se,
            "distinct2_ci": list(bootstrap_interval(d2_values)), "stderr": ppl * se, "ci": ci,
            "ci_method": {"gen_ppl": BOOTSTRAP, "distinct2": BOOTSTRAP}, "n": len(records),
            "empty": len(records) - len(scored)}


# ----- aggregation ----------------------------------------------------------------------------------------------------
def aggregate_mean(records: list[dict], metrics, main: str) -> dict:
    """Mean, stderr and 95% interval of each per-example metric (Wilson for `PROPORTION_METRICS`, else the seeded
    bootstrap); "stderr" / "ci" are the main metric's; "n" the number of records."""
    out: dict = {}
    methods: dict = {}
    for m in metrics:
        values = [float(r[m]) for r in records if r.get(m) is not None]
        if values:
            out[m], out[f"{m}_stderr"] = mean_stderr(values)
            if m in PROPORTION_METRICS:
                out[f"{m}_ci"], methods[m] = list(wilson_interval(sum(values), len(values))), "wilson"
            else:
                out[f"{m}_ci"], methods[m] = list(bootstrap_interval(values)), BOOTSTRAP
    out["stderr"] = out.get(f"{main}_stderr", float("nan"))
    out["ci"] = out.get(f"{main}_ci", [float("nan"), float("nan")])
    out["ci_method"] = methods
    out["n"] = len(records)
    return out


def aggregate(spec: TaskSpec, records: list[dict]) -> dict:
    if spec.aggregate is not None:
        return spec.aggregate(records, spec.main)
    return aggregate_mean(records, spec.metrics, spec.main)


# ----- registry -------------------------------------------------------------------------------------------------------
def _data(loader):
    return lambda data_dir, s: loader(data_dir)


def _qa_data(loader):
    """A QA loader with the run's k-shot prompts (`shots`, drawn with the run's seed)."""
    return lambda data_dir, s: D.with_qa_shots(loader(data_dir), s.shots, s.seed)


def _gsm8k_data(data_dir: Path, s) -> list[D.MathExample]:
    test = D.load_gsm8k(data_dir, form=s.gsm8k_format)
    train = D.load_gsm8k(data_dir, "train", form=s.gsm8k_format) if s.shots else []
    return D.with_gsm8k_shots(test, train, s.shots, s.seed)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("incontext", "In-context (app)", lambda data_dir, s: D.load_incontext(), eval_incontext, ("acc",), "acc",
             description="the playground's In-context examples, scored as its scoreboard scores them"),
    TaskSpec("triviaqa", "TriviaQA", _qa_data(D.load_triviaqa), eval_qa, ("em",), "em",
             description="closed-book QA, exact match over aliases (llm-foundry 3000-question subsample)"),
    TaskSpec("triviaqa_full", "TriviaQA (full)", _qa_data(D.load_triviaqa_full), eval_qa, ("em",), "em",
             description="closed-book QA, exact match over aliases (unfiltered dev, 11313)"),
    TaskSpec("lambada", "Lambada", _data(D.load_lambada), eval_lastword, ("acc",), "acc",
             aggregate=aggregate_lastword, description="last-word accuracy (OpenAI LAMBADA)"),
    TaskSpec("lambada_paper", "Lambada (paper file)", _data(D.load_lambada_paper), eval_lastword, ("acc",), "acc",
             aggregate=aggregate_lastword, description="last-word accuracy on the paper's own plain-text file"),
    TaskSpec("hellaswag", "HellaS.", _data(D.load_hellaswag), eval_mc, ("acc", "acc_norm"), "acc_norm",
             description="multiple choice, 4 endings, lm-eval's preprocessing; the column is acc_norm (per byte: "
                         "summed scores favour short endings; the paper's code also length-normalises)"),
    TaskSpec("winogrande", "Wino.", _data(D.load_winogrande), eval_mc, ("acc",), "acc",
             description="multiple choice, partial scoring (continuation given each filled-in context)"),
    TaskSpec("siqa", "SIQA", _data(D.load_siqa), eval_mc, ("acc", "acc_norm"), "acc",
             description="multiple choice, 3 answers"),
    TaskSpec("piqa", "PIQA", _data(D.load_piqa), eval_mc, ("acc", "acc_norm"), "acc",
             description="multiple choice, 2 solutions"),
    TaskSpec("gsm8k", "GSM8K", _gsm8k_data, eval_gsm8k, ("acc",), "acc", rescore=rescore_gsm8k,
             description="grade-school math, the number after #### (else the last one); --shots, --gsm8k-format"),
    TaskSpec("rocstories", "ROCStories", _data(D.load_rocstories), eval_story_infill,
             ("rouge1", "rouge2", "rougeL"), "rouge1",
             description="infill sentence 3 from 1-2 and 4-5 (AR: prefix only); ROUGE-1/2/L F1 x 100"),
    TaskSpec("humaneval_infill", "Code", _data(D.load_humaneval_infill), eval_code_infill, ("pass@1",), "pass@1",
             description="HumanEval single-line infilling, pass@1 (tests run in a sandboxed subprocess)"),
    TaskSpec("elbo_ppl", "PPL (held-out)", load_ppl, eval_ppl, ("ppl",), "ppl", aggregate=aggregate_ppl,
             description="perplexity of held-out Gutenberg paragraphs (DLM: ELBO upper bound)"),
]}

GENPPL = re.compile(r"^genppl(\d+)?$")
# Column order of the paper's Table 1, then everything else.
TABLE_ORDER = ("triviaqa", "triviaqa_full", "lambada", "lambada_paper", "hellaswag", "winogrande", "siqa", "piqa",
               "gsm8k", "rocstories", "humaneval_infill")


def genppl_spec(name: str, default_length: int) -> TaskSpec:
    m = GENPPL.match(name)
    length = int(m.group(1)) if m.group(1) else default_length
    if length < 1:
        raise ValueError(f"{name}: the generation length must be >= 1")
    return TaskSpec(name, f"Gen-PPL@{length}", load_genppl, lambda b, ex: eval_genppl(b, ex, length),
                    ("gen_ppl", "distinct2"), "gen_ppl", aggregate=aggregate_genppl,
                    description=f"{length}-token samples: perplexity under an AR judge, distinct-2")


def mc_file_spec(path: Path) -> TaskSpec:
    """A task for a multiple-choice JSONL file (`--task-file`), named after the file; a file of HellaSwag records is
    the `hellaswag` task (its column in Table 1) read from that file."""
    path = Path(path)
    if D.is_hellaswag_file(path):
        return replace(TASKS["hellaswag"], load=lambda data_dir, s: D.load_mc_file(path),
                       description=f"HellaSwag from {path}")
    name = path.name.split(".")[0]
    return TaskSpec(name, name, lambda data_dir, s: D.load_mc_file(path), eval_mc, ("acc", "acc_norm"), "acc",
                    description=f"multiple choice from {path}")


def get_task(name: str, gen_length: int = 64) -> TaskSpec:
    if name in TASKS:
        return TASKS[name]
    if GENPPL.match(name):
        return genppl_spec(name, gen_length)
    raise KeyError(f"unknown task {name!r}; known: {', '.join(list(TASKS) + ['genppl', 'genppl<N>'])} "
                   "(or --task-file PATH for a multiple-choice JSONL)")
