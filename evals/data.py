"""Task data: where it lives and how each file format becomes a list of examples.

The data is not part of the repository: it is read from `--data-dir` (default `../shared/data` next to the repo,
or `$DLM_DATA_DIR`); the formats are those described in that folder's SOURCES.md. Every loader returns a list of
small dataclasses whose `id` is the line / row index in the file, so predictions stay addressable across reruns.
"""
from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dlm.fileio import default_data_dir  # noqa: F401  (re-exported: the evals' and the benches' default data folder)


class MissingDataError(FileNotFoundError):
    """A task's data file is not where it should be; the message says which file and how to point at it."""


def require(data_dir: Path, relative: str, task: str) -> Path:
    path = Path(data_dir) / relative
    if not path.is_file():
        raise MissingDataError(
            f"task {task!r} needs {relative} under the data directory {Path(data_dir)} but {path} does not exist; "
            f"pass --data-dir DIR (a folder holding {relative}) or set DLM_DATA_DIR")
    _note_file(path)
    return path


# ----- which files a task read, and their hashes (recorded in the run's config.json) ---------------------------------
_RECORDERS: list[list[Path]] = []


def _note_file(path: Path) -> None:
    for files in _RECORDERS:
        if path not in files:
            files.append(path)


@contextmanager
def recording_files():
    """`with recording_files() as files: spec.load(...)` -> `files` lists every data file the loader read."""
    files: list[Path] = []
    _RECORDERS.append(files)
    try:
        yield files
    finally:
        _RECORDERS.remove(files)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprints(files, data_dir: Optional[Path] = None) -> dict[str, dict]:
    """{name: {"sha256", "bytes"}} for each file; names are relative to `data_dir` when the file lies inside it."""
    out = {}
    for f in files:
        f = Path(f)
        try:
            name = str(f.resolve().relative_to(Path(data_dir).resolve())) if data_dir else str(f)
        except ValueError:
            name = str(f.resolve())
        out[name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _labels(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def _check_aligned(items: list, labels: list, items_path: Path, labels_path: Path) -> None:
    if len(items) != len(labels):
        raise ValueError(f"{items_path} has {len(items)} items but {labels_path} has {len(labels)} labels")


# ----- example records -----------------------------------------------------------------------------------------------
@dataclass
class MCExample:
    """Multiple choice: choice k is scored as log p(continuations[k] | contexts[k]); `gold` indexes the answer.

    Most tasks share one context across choices; WinoGrande varies the context (the blank filled with each option)
    and scores the same continuation (lm-eval's partial scoring)."""
    id: int
    contexts: list[str]
    continuations: list[str]
    gold: int


@dataclass
class LastWordExample:
    """LAMBADA: predict `target` (the last word, with its leading space) after `context`."""
    id: int
    context: str
    target: str


@dataclass
class ICLExample:
    """One of the playground's In-context examples (`dlm.fewshot.Example`, with an expected answer)."""
    id: int
    example: object


def load_incontext() -> list[ICLExample]:
    """The In-context tab's shipped examples that have an expected answer (their files' hashes are recorded)."""
    from dlm.fewshot import EXAMPLES_DIR, load_examples
    for path in sorted(EXAMPLES_DIR.glob("*.txt")):
        _note_file(path)
    return [ICLExample(i, e) for i, e in enumerate(e for e in load_examples() if e.expected)]


@dataclass
class QAExample:
    """Closed-book QA: generate an answer to `prompt`; correct if it matches any of `aliases`."""
    id: int
    prompt: str
    answer: str
    aliases: list[str]


@dataclass
class InfillExample:
    """Fill the text between `prefix` and `suffix`; `target` is the reference middle. `meta`: task extras."""
    id: int
    prefix: str
    suffix: str
    target: str
    meta: dict = field(default_factory=dict)


@dataclass
class MathExample:
    """GSM8K: `question`, the reference solution `solution` and its final number `answer`; `shots` (few-shot
    evaluation) is the text of the solved examples put before the question."""
    id: int
    question: str
    solution: str
    answer: str
    shots: str = ""


@dataclass
class TextExample:
    """A span of held-out text (perplexity) or a prompt for free generation (generation quality)."""
    id: int
    text: str


# ----- multiple choice -----------------------------------------------------------------------------------------------
def _mc(i: int, context: str, choices: list[str], gold: int) -> MCExample:
    return MCExample(i, [context] * len(choices), [" " + c.strip() for c in choices], gold)


def load_piqa(data_dir: Path) -> list[MCExample]:
    """PIQA dev (1838): lm-eval's prompt "Question: {goal}\\nAnswer:" and choices " {sol1}" / " {sol2}"."""
    items_path = require(data_dir, "piqa/valid.jsonl", "piqa")
    labels_path = require(data_dir, "piqa/valid-labels.lst", "piqa")
    items, labels = _jsonl(items_path), _labels(labels_path)
    _check_aligned(items, labels, items_path, labels_path)
    return [_mc(i, f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], y)
            for i, (d, y) in enumerate(zip(items, labels))]


def load_siqa(data_dir: Path) -> list[MCExample]:
    """Social IQa dev (1954): lm-eval's "Q: {context} {question}\\nA:" with 3 answers; labels 1..3 -> 0..2."""
    items_path = require(data_dir, "siqa/dev.jsonl", "siqa")
    labels_path = require(data_dir, "siqa/dev-labels.lst", "siqa")
    items, labels = _jsonl(items_path), _labels(labels_path)
    _check_aligned(items, labels, items_path, labels_path)
    return [_mc(i, f"Q: {d['context']} {d['question']}\nA:", [d["answerA"], d["answerB"], d["answerC"]], y - 1)
            for i, (d, y) in enumerate(zip(items, labels))]


def load_winogrande(data_dir: Path) -> list[MCExample]:
    """WinoGrande dev (1267), llm-foundry layout: one context per option, shared continuation (partial scoring)."""
    rows = _jsonl(require(data_dir, "winogrande/winogrande.jsonl", "winogrande"))
    return [MCExample(i, list(d["context_options"]), [" " + d["continuation"].strip()] * len(d["context_options"]),
                      int(d["gold"])) for i, d in enumerate(rows)]


HELLASWAG_KEYS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


def hellaswag_example(i: int, d: dict, where: str) -> MCExample:
    """One HellaSwag record (the dataset's own JSONL: activity_label, ctx_a, ctx_b, endings, label) with
    lm-evaluation-harness's preprocessing (`lm_eval.tasks.hellaswag.utils.preprocess`: " [title]" -> ". ", other
    [bracketed] WikiHow artifacts dropped, double spaces collapsed): context "{activity_label}: {ctx_a}
    {Ctx_b}", the four endings as continuations after one space."""
    from lm_eval.tasks.hellaswag.utils import preprocess
    missing = [k for k in HELLASWAG_KEYS if k not in d]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; a HellaSwag line needs "
                         f"{', '.join(HELLASWAG_KEYS)} (the test split has no labels: use the validation file)")
    endings, label = d["endings"], d["label"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: 'endings' must be a list of at least 2 strings")
    try:  # the official JSONL has an int, the Hugging Face copy a string
        gold = int(label)
    except (TypeError, ValueError):
        gold = -1
    if isinstance(label, bool) or not 0 <= gold < len(endings):
        raise ValueError(f"{where}: 'label' must be an index into endings (0..{len(endings) - 1}), got {label!r}")
    context = preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
    return _mc(i, context, [preprocess(e) for e in endings], gold)


def is_hellaswag_record(d) -> bool:
    return isinstance(d, dict) and "ctx_a" in d and "endings" in d


def is_hellaswag_file(path: Path) -> bool:
    """Whether a --task-file holds HellaSwag's own records (judged by its first line)."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        return is_hellaswag_record(json.loads(first)) if first else False
    except (OSError, ValueError):
        return False


def load_hellaswag(data_dir: Path) -> list[MCExample]:
    """HellaSwag validation (10042), the dataset's own `hellaswag_val.jsonl` (github.com/rowanz/hellaswag, data/);
    users bring the file (it is not in ../shared/data)."""
    path = require(data_dir, "hellaswag/hellaswag_val.jsonl", "hellaswag")
    return [hellaswag_example(i, d, f"{path} line {i + 1}") for i, d in enumerate(_jsonl(path))]


def load_mc_file(path: Path) -> list[MCExample]:
    """Multiple-choice JSONL for `--task-file`: one `{"context": str, "choices": [str, ...], "gold": int}` per line,
    or HellaSwag's own records (recognised by `ctx_a` / `endings`; see `hellaswag_example`).

    Choices are scored as continuations of the context, with one space between them (lm-eval's default)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"--task-file {path} does not exist")
    _note_file(path)
    rows = _jsonl(path)
    if rows and is_hellaswag_record(rows[0]):
        return [hellaswag_example(i, d, f"{path} line {i + 1}") for i, d in enumerate(rows)]
    out = []
    for i, d in enumerate(rows):
        missing = [k for k in ("context", "choices", "gold") if k not in d]
        if missing:
            raise ValueError(f"{path} line {i + 1}: missing key(s) {', '.join(missing)}; each line needs "
                             '{"context": str, "choices": [str, ...], "gold": int}')
        choices, gold = d["choices"], d["gold"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{path} line {i + 1}: 'choices' must be a list of at least 2 strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f"{path} line {i + 1}: 'gold' must be an index into choices (0..{len(choices) - 1}), "
                             f"got {gold!r}")
        out.append(_mc(i, d["context"], choices, gold))
    return out


# ----- LAMBADA -------------------------------------------------------------------------------------------------------
def load_lambada(data_dir: Path) -> list[LastWordExample]:
    """LAMBADA (OpenAI detokenized, 5153): context + target word; the target gets its leading space."""
    rows = _jsonl(require(data_dir, "lambada/lambada_openai.jsonl", "lambada"))
    return [LastWordExample(i, d["context"].rstrip(" "), " " + d["continuation"]) for i, d in enumerate(rows)]


def load_lambada_paper(data_dir: Path) -> list[LastWordExample]:
    """The paper's own LAMBADA file (lower-cased, original tokenization): target = last whitespace token."""
    path = require(data_dir, "lambada/lambada_test_plain_text.txt", "lambada_paper")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if line:
            context, _, word = line.rpartition(" ")
            out.append(LastWordExample(len(out), context, " " + word))
    return out


# ----- TriviaQA -------------------------------------------------------------------------------------------------------
def load_triviaqa(data_dir: Path) -> list[QAExample]:
    """llm-foundry's TriviaQA subsample (3000; prompt "Question: ...\\nAnswer:", answers <= 10 tokens)."""
    rows = _jsonl(require(data_dir, "triviaqa/triviaqa_sm_sub.jsonl", "triviaqa"))
    return [QAExample(i, d["context"], d["answer"], list(d["aliases"])) for i, d in enumerate(rows)]


def load_triviaqa_full(data_dir: Path) -> list[QAExample]:
    """Unfiltered TriviaQA dev as DPR's trivia-test (11313): TSV question <TAB> Python list of aliases."""
    path = require(data_dir, "triviaqa/topics.dpr.trivia.test.txt", "triviaqa_full")
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t"):
            if len(row) < 2:
                continue
            aliases = ast.literal_eval(row[1])
            out.append(QAExample(len(out), f"Question: {row[0]}\nAnswer:", aliases[0], list(aliases)))
    return out


# ----- infilling ------------------------------------------------------------------------------------------------------
def load_rocstories(data_dir: Path) -> list[InfillExample]:
    """ROCStories (Story Cloze val, 1871 stories = sentences 1-4 + the right ending): infill sentence 3 between
    sentences 1-2 and 4-5 (the paper's setting). The middle carries its leading space."""
    path = require(data_dir, "rocstories/cloze_test_val__spring2016.csv", "rocstories")
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            ending = row["RandomFifthSentenceQuiz1"] if row["AnswerRightEnding"].strip() == "1" \
                else row["RandomFifthSentenceQuiz2"]
            s = [row[f"InputSentence{k}"].strip() for k in (1, 2, 3, 4)] + [ending.strip()]
            out.append(InfillExample(i, f"{s[0]} {s[1]}", f" {s[3]} {s[4]}", " " + s[2], {"id": row["InputStoryid"]}))
    return out


def load_humaneval_infill(data_dir: Path) -> list[InfillExample]:
    """HumanEval single-line infilling (1033): prefix = prompt, suffix, target = canonical middle line."""
    rows = _jsonl(require(data_dir, "humaneval_infilling/HumanEval-SingleLineInfilling.jsonl.gz", "humaneval_infill"))
    return [InfillExample(i, d["prompt"], d["suffix"], d["canonical_solution"],
                          {"task_id": d["task_id"], "test": d["test"], "entry_point": d["entry_point"]})
            for i, d in enumerate(rows)]


# ----- GSM8K ----------------------------------------------------------------------------------------------------------
def load_gsm8k(data_dir: Path, split: str = "test", form: str = "full") -> list[MathExample]:
    """GSM8K `split` with each solution in `form` (`metrics.GSM8K_FORMATS`: full, symbolic)."""
    from .metrics import GSM8K_FORMATS, gsm8k_gold
    rows = _jsonl(require(data_dir, f"gsm8k/{split}.jsonl", "gsm8k"))
    return [MathExample(i, d["question"], GSM8K_FORMATS[form](d["answer"]), gsm8k_gold(d["answer"]))
            for i, d in enumerate(rows)]


# ----- few-shot prompts -----------------------------------------------------------------------------------------------
def gsm8k_shot(ex: MathExample) -> str:
    return f"Question: {ex.question}\nAnswer: {ex.solution}"


def qa_shot(ex: QAExample) -> str:
    return f"{ex.prompt} {ex.answer}"


def shot_indices(pool_size: int, k: int, seed: int, example_id: int, exclude_same: bool) -> list[int]:
    """k distinct pool indices for example `example_id`, drawn with a seed of their own (the same shots on every
    rerun and for every model, whatever the evaluated slice); the example itself never (same-file pools)."""
    import random
    rng = random.Random(seed * 1_000_003 + 7 * example_id + 11)
    candidates = [i for i in range(pool_size) if not (exclude_same and i == example_id)]
    return rng.sample(candidates, min(k, len(candidates)))


def with_qa_shots(examples: list[QAExample], k: int, seed: int) -> list[QAExample]:
    """TriviaQA k-shot: k other questions of the same file, answered, before each prompt (the file has no train
    split; the example itself is never among its shots)."""
    if k <= 0:
        return examples
    return [QAExample(ex.id, "\n\n".join([*(qa_shot(examples[j]) for j in shot_indices(len(examples), k, seed, ex.id,
                                                                                       True)), ex.prompt]),
                      ex.answer, ex.aliases) for ex in examples]


def with_gsm8k_shots(examples: list[MathExample], train: list[MathExample], k: int, seed: int) -> list[MathExample]:
    """GSM8K k-shot: k solved problems of the train split before each test question."""
    if k <= 0:
        return examples
    return [MathExample(ex.id, ex.question, ex.solution, ex.answer,
                        "".join(gsm8k_shot(train[j]) + "\n\n"
                                for j in shot_indices(len(train), k, seed, ex.id, False))) for ex in examples]


# ----- held-out text (Gutenberg) --------------------------------------------------------------------------------------
# Books the training corpus must leave out; evaluation reads the first one. Keep in sync with train/'s held-out list.
HELDOUT_BOOKS = ("pg1661.txt.gz",)


def strip_gutenberg(text: str) -> str:
    """Keep what lies between the `*** START OF ...` and `*** END OF ...` markers (all of it when absent)."""
    start = text.find("*** START OF")
    if start != -1:
        start = text.find("\n", start) + 1
    end = text.find("*** END OF")
    return text[max(start, 0): end if end != -1 else len(text)].replace("\r\n", "\n").strip()


def load_heldout_text(data_dir: Path, book: Optional[str] = None) -> str:
    name = book or HELDOUT_BOOKS[0]
    path = require(data_dir, f"gutenberg/{name}", "elbo_ppl / genppl")
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return strip_gutenberg(f.read())


def heldout_paragraphs(data_dir: Path, book: Optional[str] = None, min_words: int = 40) -> list[TextExample]:
    """Paragraphs of the held-out book with at least `min_words` words (line breaks inside a paragraph joined)."""
    text = load_heldout_text(data_dir, book)
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [TextExample(i, p) for i, p in enumerate(p for p in paras if len(p.split()) >= min_words)]
