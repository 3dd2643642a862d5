"""evals/: scoring functions on hand-computed cases, every task format on small fixture files, sandboxed pass@1,
resumable output directories, and the CLI on a tiny random model (AR and DLM paths)."""
from __future__ import annotations

import csv
import gzip
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from evals import data as D
from evals.cli import main as evals_main
from evals.eval_model import EvalModel, EvalSettings, default_kind
from evals.execution import humaneval_program, run_program, single_line
from evals.metrics import (
    distinct_n,
    exact_match,
    first_answer_span,
    gsm8k_gold,
    gsm8k_prediction,
    mean_stderr,
    normalize_answer,
    numbers_equal,
    rouge_scores,
)
from evals.report import format_cell, markdown_table
from evals.runner import run_task
from evals.store import ConfigMismatch, PredictionStore, prepare_out_dir
from evals.tasks import TASKS, TaskSpec, aggregate_mean, get_task

# ----- fixture data: a few lines of every format in ../shared/data (see its SOURCES.md) ----------------------------
GOOD_LINE = "    return [x for x in strings if substring in x]\n"
HUMANEVAL = {
    "task_id": "SingleLineInfilling/HumanEval/7/L0", "entry_point": "filter_by_substring",
    "prompt": "from typing import List\n\n\ndef filter_by_substring(strings: List[str], substring: str) -> "
              "List[str]:\n    \"\"\" Filter strings containing substring \"\"\"\n",
    "suffix": "", "canonical_solution": GOOD_LINE,
    "test": "\n\ndef check(candidate):\n    assert candidate([], 'john') == []\n"
            "    assert candidate(['xxx', 'asd', 'xxy'], 'xx') == ['xxx', 'xxy']\n",
}


def _write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)


def make_data_dir(root: Path) -> Path:
    d = root / "data"
    _write_jsonl(d / "piqa/valid.jsonl", [
        {"goal": "How do you boil water?", "sol1": "Put it in a pot on the stove.", "sol2": "Put it in the fridge."},
        {"goal": "How to dry wet hands?", "sol1": "Dip them in water.", "sol2": "Use a towel."},
        {"goal": "Keep bread fresh", "sol1": "Seal it in a bag.", "sol2": "Leave it in the sun."}])
    (d / "piqa/valid-labels.lst").write_text("0\n1\n0\n")
    _write_jsonl(d / "siqa/dev.jsonl", [
        {"context": "Alex gave Sam a gift.", "question": "How would Sam feel?", "answerA": "happy",
         "answerB": "angry", "answerC": "bored"},
        {"context": "Jo missed the bus.", "question": "What will Jo do next?", "answerA": "sleep",
         "answerB": "walk to work", "answerC": "fly"}])
    (d / "siqa/dev-labels.lst").write_text("1\n2\n")
    _write_jsonl(d / "winogrande/winogrande.jsonl", [
        {"context_options": ["The cup fell on the rug and the cup", "The cup fell on the rug and the rug"],
         "continuation": "broke.", "gold": 0}])
    _write_jsonl(d / "lambada/lambada_openai.jsonl", [
        {"context": "She opened the door and let the cat out. Then she called the", "continuation": "cat"},
        {"context": "He drank a glass of", "continuation": "water"}])
    (d / "lambada/lambada_test_plain_text.txt").write_text("he drank a glass of water\nthe sky is blue\n")
    _write_jsonl(d / "triviaqa/triviaqa_sm_sub.jsonl", [
        {"context": "Question: What is the capital of France?\nAnswer:", "answer": "Paris",
         "aliases": ["Paris", "Paris, France"]}])
    (d / "triviaqa/topics.dpr.trivia.test.txt").write_text(
        "Who wrote Hamlet?\t['William Shakespeare', 'Shakespeare']\n"
        "\"Capital, of France?\"\t['Paris']\n")
    (d / "rocstories").mkdir(parents=True)
    with open(d / "rocstories/cloze_test_val__spring2016.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                    "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"])
        w.writerow(["s1", "Tom was hungry.", "He opened the fridge.", "It was empty.", "He went to the store.",
                    "He flew to Mars.", "He bought some food.", "2"])
    _write_jsonl(d / "humaneval_infilling/HumanEval-SingleLineInfilling.jsonl.gz", [HUMANEVAL], gz=True)
    _write_jsonl(d / "gsm8k/test.jsonl", [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
         "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}])
    book = ("The Project Gutenberg header\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n"
            + "\r\n\r\n".join(" ".join(f"word{i}_{j}" for j in range(45)) for i in range(3))
            + "\r\n\r\nshort para\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicense text\r\n")
    (d / "gutenberg").mkdir(parents=True)
    with gzip.open(d / "gutenberg" / D.HELDOUT_BOOKS[0], "wt", encoding="utf-8") as f:
        f.write(book)
    return d


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return make_data_dir(tmp_path)


# ----- metrics -------------------------------------------------------------------------------------------------------
def test_normalize_and_exact_match_over_aliases():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an Apple a day") == "apple day"
    assert exact_match("the onion", ["Onion skins", "Onion"]) == 1.0
    assert exact_match("Bulb onions", ["Onion", "Bulb onion"]) == 0.0  # plural is a different answer
    assert exact_match("PARIS.", ["Paris, France", "paris"]) == 1.0
    assert exact_match("", ["Paris"]) == 0.0


def test_first_answer_span_cuts_at_stop_strings():
    assert first_answer_span(" Paris, France.\nQuestion: next") == "Paris"
    assert first_answer_span(" William Shakespeare\nQ") == "William Shakespeare"
    assert first_answer_span("no stop here ") == "no stop here"


def test_rouge_hand_computed():
    # unigrams: 5 of 6 shared each way -> F1 = 5/6; bigrams: 3 of 5 -> 0.6; LCS "the cat on the mat" = 5 -> 5/6
    s = rouge_scores("the cat sat on the mat", "the cat is on the mat")
    assert s["rouge1"] == pytest.approx(100 * 5 / 6)
    assert s["rouge2"] == pytest.approx(60.0)
    assert s["rougeL"] == pytest.approx(100 * 5 / 6)
    assert rouge_scores("completely different", "the cat is on the mat")["rouge1"] == 0.0


def test_gsm8k_answer_parsing():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_gold("... #### 1,234") == "1234"
    assert gsm8k_prediction("9 * 2 = 18 dollars.\n#### 18") == "18"
    assert gsm8k_prediction("First 3 + 4 = 7, so the answer is $1,000.00.") == "1000"
    assert gsm8k_prediction("it is -3 degrees") == "-3"
    assert gsm8k_prediction("half: 0.5") == "0.5"
    assert gsm8k_prediction("#### 72 (and 5 more words 9)") == "72"
    assert gsm8k_prediction("I do not know") is None
    assert numbers_equal("18", "18.0") and not numbers_equal("18", "19") and not numbers_equal(None, "1")
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker")


def test_mean_stderr_and_distinct():
    mean, se = mean_stderr([1, 0, 1, 1])  # sample std 0.5 -> se 0.5 / 2
    assert mean == 0.75 and se == pytest.approx(0.25)
    assert math.isnan(mean_stderr([1.0])[1])
    assert distinct_n("a b a b", 2) == pytest.approx(2 / 3)
    assert distinct_n("one two three", 2) == 1.0
    assert math.isnan(distinct_n("single", 2))


# ----- sandboxed execution (pass@1) ----------------------------------------------------------------------------------
def _program(completion: str) -> str:
    h = HUMANEVAL
    return humaneval_program(h["prompt"], completion, h["suffix"], h["test"], h["entry_point"])


def test_pass_at_1_known_good_and_known_bad():
    assert run_program(_program(GOOD_LINE)).passed
    bad = run_program(_program("    return strings\n"))  # ignores the filter: the second assert fails
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.detail
    broken = run_program(_program("    return [x for x in\n"))
    assert not broken.passed and "SyntaxError" in broken.detail


def test_execution_is_out_of_process_and_time_limited(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run_program("import os\nopen('marker', 'w').write('x')\nos.environ['LEAK'] = '1'\n")
    assert res.passed
    assert not (tmp_path / "marker").exists() and "LEAK" not in os.environ
    slow = run_program("while True:\n    pass\n", timeout=1.5)
    assert slow.status == "timeout" and not slow.passed


def test_single_line_keeps_first_line_only():
    assert single_line("    x = 1\n    y = 2\n") == "    x = 1\n"
    assert single_line("    x = 1") == "    x = 1\n"


# ----- task formats --------------------------------------------------------------------------------------------------
def test_every_task_format_loads(data_dir):
    piqa = D.load_piqa(data_dir)
    assert [e.gold for e in piqa] == [0, 1, 0]
    assert piqa[0].contexts[0] == "Question: How do you boil water?\nAnswer:"
    assert piqa[0].continuations == [" Put it in a pot on the stove.", " Put it in the fridge."]
    siqa = D.load_siqa(data_dir)
    assert [e.gold for e in siqa] == [0, 1] and len(siqa[0].continuations) == 3  # labels 1..3 -> 0..2
    assert siqa[1].contexts[0] == "Q: Jo missed the bus. What will Jo do next?\nA:"
    wino = D.load_winogrande(data_dir)[0]
    assert wino.contexts[1].endswith("the rug") and wino.continuations == [" broke.", " broke."] and wino.gold == 0
    lam = D.load_lambada(data_dir)
    assert lam[1].context == "He drank a glass of" and lam[1].target == " water"
    assert D.load_lambada_paper(data_dir)[1].target == " blue"
    qa = D.load_triviaqa(data_dir)[0]
    assert qa.answer == "Paris" and "Paris, France" in qa.aliases
    full = D.load_triviaqa_full(data_dir)
    assert full[0].aliases == ["William Shakespeare", "Shakespeare"] and full[1].prompt.startswith("Question: Capital,")
    story = D.load_rocstories(data_dir)[0]
    assert story.prefix == "Tom was hungry. He opened the fridge."
    assert story.suffix == " He went to the store. He bought some food."  # AnswerRightEnding = 2
    assert story.target == " It was empty."
    code = D.load_humaneval_infill(data_dir)[0]
    assert code.target == GOOD_LINE and code.meta["entry_point"] == "filter_by_substring"
    assert D.load_gsm8k(data_dir)[0].answer == "7"
    paras = D.heldout_paragraphs(data_dir)
    assert len(paras) == 3 and "Gutenberg" not in " ".join(p.text for p in paras)


def test_generic_multiple_choice_file(tmp_path):
    f = tmp_path / "mytask.jsonl"
    _write_jsonl(f, [{"context": "2 + 2 =", "choices": ["4", "5"], "gold": 0}])
    ex = D.load_mc_file(f)[0]
    assert ex.continuations == [" 4", " 5"] and ex.gold == 0
    _write_jsonl(f, [{"context": "x", "choices": ["a", "b"], "gold": 2}])
    with pytest.raises(ValueError, match="line 1: 'gold' must be an index"):
        D.load_mc_file(f)
    _write_jsonl(f, [{"context": "x", "choices": ["a", "b"]}])
    with pytest.raises(ValueError, match="missing key"):
        D.load_mc_file(f)


def test_missing_data_message_names_file_and_flag(tmp_path):
    with pytest.raises(D.MissingDataError, match=r"piqa/valid.jsonl.*--data-dir"):
        D.load_piqa(tmp_path)


def test_task_registry():
    assert get_task("genppl128").title == "Gen-PPL@128"
    assert get_task("genppl", gen_length=32).title == "Gen-PPL@32"
    with pytest.raises(KeyError, match="unknown task 'hellaswagg'"):
        get_task("hellaswagg")


def test_default_kind(tmp_path):
    assert default_kind(SimpleNamespace(config=SimpleNamespace(adapted=True))) == "dlm"
    assert default_kind(SimpleNamespace(config=SimpleNamespace(adapted=False))) == "ar"
    (tmp_path / "dlm_config.json").write_text("{}")
    assert default_kind(SimpleNamespace(config=SimpleNamespace()), str(tmp_path)) == "dlm"
    assert default_kind(SimpleNamespace(config=SimpleNamespace()), str(tmp_path / "nope")) == "ar"


# ----- backends on a tiny model --------------------------------------------------------------------------------------
def test_ar_batch_scores_match_exact_scorer_and_greedy_flag(tiny_dlm):
    b = EvalModel(tiny_dlm, EvalSettings(kind="ar"))
    greedy = tiny_dlm.ar_generate("The weather today is", max_new_tokens=3).text
    pairs = [("The weather today is", greedy), ("The weather today is", " purple elephant dancing"),
             ("Hi", " there")]
    lls = b.loglikelihoods(pairs, seed=0)
    for ll, (c, k) in zip(lls, pairs):
        assert ll.logprob == pytest.approx(tiny_dlm.ar_score(c, k).logprob, abs=1e-3)
    assert lls[0].greedy is True and lls[1].greedy is False


def test_dlm_scores_reproducible_per_seed(tiny_dlm):
    b = EvalModel(tiny_dlm, EvalSettings(kind="dlm", n_samples=4))
    pairs = [("The sky is", " blue and clear"), ("The sky is", " green today, oddly")]
    a, c, d = b.loglikelihoods(pairs, 1), b.loglikelihoods(pairs, 1), b.loglikelihoods(pairs, 2)
    assert [x.logprob for x in a] == [x.logprob for x in c]
    assert [x.logprob for x in a] != [x.logprob for x in d]
    assert all(x.greedy is None and x.stderr > 0 for x in a)


# ----- output directory: resumable, settings-checked ------------------------------------------------------------------
def test_resume_skips_finished_examples(tmp_path, tiny_dlm, data_dir):
    calls = []
    base = TASKS["piqa"]

    def counting(b, ex):
        calls.append(ex.id)
        return base.evaluate(b, ex)

    spec = TaskSpec("piqa", "PIQA", base.load, counting, base.metrics, base.main)
    examples = D.load_piqa(data_dir)
    backend = EvalModel(tiny_dlm, EvalSettings(kind="ar"))
    path = tmp_path / "piqa.jsonl"
    first = run_task(backend, spec, examples[:2], PredictionStore(path), progress=False)
    assert calls == [0, 1] and first["n"] == 2
    with open(path, "a") as f:
        f.write('{"id": 2, "gold"')  # a record torn by a crash: that example runs again
    full = run_task(backend, spec, examples, PredictionStore(path), progress=False)
    assert calls == [0, 1, 2] and full["n"] == 3
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [0, 1, 2]
    again = run_task(backend, spec, examples, PredictionStore(path), progress=False)
    assert calls == [0, 1, 2] and again == full


def test_out_dir_refuses_other_settings(tmp_path):
    cfg = {"model": "m", "settings": {"kind": "dlm", "n_samples": 32}}
    prepare_out_dir(tmp_path, cfg)
    (tmp_path / "predictions" / "piqa.jsonl").write_text('{"id": 0}\n')
    prepare_out_dir(tmp_path, cfg)  # same settings: fine, predictions kept
    assert (tmp_path / "predictions" / "piqa.jsonl").exists()
    other = {"model": "m", "settings": {"kind": "dlm", "n_samples": 8}}
    with pytest.raises(ConfigMismatch, match="n_samples: 32 -> 8"):
        prepare_out_dir(tmp_path, other)
    prepare_out_dir(tmp_path, other, overwrite=True)
    assert not (tmp_path / "predictions" / "piqa.jsonl").exists()


def test_aggregate_and_table_cells():
    recs = [{"id": 0, "acc": 1.0}, {"id": 1, "acc": 0.0}, {"id": 2, "acc": 1.0}, {"id": 3, "acc": 1.0}]
    res = aggregate_mean(recs, ("acc", "acc_norm"), "acc")
    wilson = [pytest.approx(0.3006418, abs=1e-6), pytest.approx(0.9544127, abs=1e-6)]  # 3 of 4 (statsmodels)
    assert res == {"acc": 0.75, "acc_stderr": pytest.approx(0.25), "acc_ci": wilson, "stderr": pytest.approx(0.25),
                   "ci": wilson, "ci_method": {"acc": "wilson"}, "n": 4}
    assert format_cell("piqa", res) == "75.0 [30.1, 95.4]"
    assert format_cell("piqa", {"acc": 0.75, "acc_stderr": 0.25}) == "75.0 ± 25.0"  # results from before intervals
    assert format_cell("rocstories", {"rouge1": 20.0, "rouge2": 5.25, "rougeL": 18.0}) == "20.0/5.2/18.0"
    assert format_cell("rocstories", {"rouge1": 20.0, "rouge2": 5.25, "rougeL": 18.0, "rouge1_ci": [17.04, 23.0]}) \
        == "20.0/5.2/18.0 (R1 [17.0, 23.0])"
    table = markdown_table([({"model": "a", "settings": {"kind": "ar"}}, {"piqa": res}),
                            ({"model": "b", "settings": {"kind": "dlm"}}, {"lambada": res})])
    header, _, row_a, row_b = table.splitlines()[:4]
    assert header == "| Model | Lambada | PIQA |"  # the paper's column order
    assert row_a == "| a (AR) | – | 75.0 [30.1, 95.4] |" and row_b == "| b (DLM) | 75.0 [30.1, 95.4] | – |"


# ----- the CLI end to end on a tiny random model ----------------------------------------------------------------------
ALL_TASKS = "piqa,siqa,winogrande,lambada,triviaqa,rocstories,humaneval_infill,gsm8k,elbo_ppl,genppl8"


@pytest.mark.parametrize("kind", ["ar", "dlm"])
def test_cli_writes_results_schema(tmp_path, tiny_llama_dir, data_dir, kind, capsys):
    mc = tmp_path / "custom_mc.jsonl"
    _write_jsonl(mc, [{"context": "2 + 2 =", "choices": ["4", "5", "22"], "gold": 0}])
    out = tmp_path / "out"
    args = ["--model", str(tiny_llama_dir), "--kind", kind, "--tasks", ALL_TASKS, "--task-file", str(mc),
            "--limit", "2", "--data-dir", str(data_dir), "--out", str(out), "--n-samples", "2",
            "--judge", str(tiny_llama_dir), "--no-progress", "--device", "cpu"]
    assert evals_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(ALL_TASKS.split(",")) | {"custom_mc"}
    for task, res in results.items():
        main_metric = get_task(task).main if task != "custom_mc" else "acc"
        assert {main_metric, "stderr", "ci", f"{main_metric}_ci", "ci_method", "n"} <= set(res), task
        assert res["n"] == (1 if task in ("winogrande", "triviaqa", "rocstories", "humaneval_infill", "gsm8k",
                                          "custom_mc") else 2), task
    assert 0.0 <= results["piqa"]["acc"] <= 1.0 and results["elbo_ppl"]["ppl"] > 1.0
    preds = [json.loads(line) for line in (out / "predictions" / "humaneval_infill.jsonl").read_text().splitlines()]
    assert preds[0]["status"] in ("passed", "failed", "timeout") and preds[0]["completion"].endswith("\n")
    table = (out / "table.md").read_text()
    assert f"({kind.upper()})" in table and "ROCStories (R1/R2/RL)" in table
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["kind"] == kind
    assert config["selection"]["limit"] == 2 and config["command"] and "torch" in config["environment"]
    assert config["data"]["piqa"].keys() == {"piqa/valid.jsonl", "piqa/valid-labels.lst"}
    assert config["data"]["custom_mc"][str(mc.resolve())]["sha256"] == D.sha256_file(mc)
    piqa_sha = D.sha256_file(data_dir / "piqa/valid.jsonl")
    assert config["data"]["piqa"]["piqa/valid.jsonl"]["sha256"] == piqa_sha
    assert f"piqa/valid.jsonl {piqa_sha[:12]}" in table and table.count("gutenberg/") == 1
    # same command again: everything is already there, nothing changes
    before = (out / "predictions" / "piqa.jsonl").read_text()
    assert evals_main(args) == 0
    assert (out / "predictions" / "piqa.jsonl").read_text() == before
    capsys.readouterr()
    assert evals_main(["table", str(out), str(out), "--out", str(tmp_path / "t.md")]) == 0
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith(f"| {tiny_llama_dir}")]
    assert len(rows) == 2 and "| PIQA |" in capsys.readouterr().out


def test_cli_missing_data_and_bad_settings(tmp_path, tiny_llama_dir, data_dir, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    code = evals_main(["--model", str(tiny_llama_dir), "--tasks", "piqa", "--data-dir", str(empty),
                       "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "skipping" in err and "piqa/valid.jsonl" in err
    code = evals_main(["--model", str(tiny_llama_dir), "--tasks", "nosuchtask", "--out", str(out)])
    assert code == 1 and "unknown task 'nosuchtask'" in capsys.readouterr().err
    base = ["--model", str(tiny_llama_dir), "--kind", "dlm", "--tasks", "piqa", "--limit", "1", "--data-dir",
            str(data_dir), "--out", str(out), "--no-progress", "--device", "cpu"]
    assert evals_main(base + ["--n-samples", "2"]) == 0
    assert evals_main(base + ["--n-samples", "3"]) == 1
    assert "n_samples: 2 -> 3" in capsys.readouterr().err


def test_skip_gives_a_dev_slice_disjoint_from_the_reported_examples(data_dir):
    from evals.cli import load_task_data
    settings = EvalSettings(kind="ar")
    (spec, first), = load_task_data(["piqa"], [], data_dir, settings, limit=1)[0]
    (_, later), = load_task_data(["piqa"], [], data_dir, settings, limit=1, skip=1)[0]
    (_, both), = load_task_data(["piqa"], [], data_dir, settings, limit=2)[0]
    assert [e.id for e in both] == [first[0].id, later[0].id] and first[0].id != later[0].id
    loaded, missing = load_task_data(["piqa"], [], data_dir, settings, limit=None, skip=10_000)
    assert loaded == [] and "no examples found after the first 10000" in missing[0]
    with pytest.raises(SystemExit):
        evals_main(["--model", "x", "--tasks", "piqa", "--skip", "-1", "--out", "o"])


def test_heldout_book_comes_from_the_checkpoint_training_record():
    from evals.cli import heldout_book_of
    training = {"heldout_books": ["../shared/data/gutenberg/46-0.txt.gz"]}
    model = SimpleNamespace(config=SimpleNamespace(training=training))
    assert heldout_book_of(model) == "46-0.txt.gz"
    assert heldout_book_of(SimpleNamespace(config=SimpleNamespace(training={}))) is None


def test_dlm_steps_fit_every_answer_length(tiny_dlm):
    b = EvalModel(tiny_dlm, EvalSettings(kind="dlm", sampler={"steps": 4, "block_length": 8}))
    assert b._config(tiny_dlm.sampler_config, b.s.sampler, 64).steps == 8   # 8 blocks need 8 steps
    assert b._config(tiny_dlm.sampler_config, b.s.sampler, 3).steps_for(3) == 3   # never more steps than tokens
    with pytest.raises(ValueError, match="unknown sampler setting 'stepz'"):
        EvalSettings(kind="dlm", sampler={"stepz": 4})
    g = b.complete("The sky is", 20, seed=0)
    assert g.nfe == 4 and len(g.token_ids) == 20


def test_row_label_names_the_kind_once():
    from evals.report import row_label
    assert row_label({"model": "smollm2-135m", "settings": {"kind": "ar"}}) == "smollm2-135m (AR)"
    assert row_label({"label": "SmolLM2 (DLM)", "settings": {"kind": "dlm"}}) == "SmolLM2 (DLM)"
    assert row_label({"label": "SmolLM2 (AR)", "settings": {"kind": "dlm"}}) == "SmolLM2 (AR) (DLM)"


def test_in_context_runs_of_one_model_are_distinct_rows_with_their_prompting_said():
    from evals.report import markdown_table, row_label
    base = {"model": "m", "settings": {"kind": "dlm", "shots": 0, "samples": 1}}
    k4 = {"model": "m", "settings": {"kind": "dlm", "shots": 4, "samples": 5, "sample_temperature": 0.7,
                                     "gsm8k_format": "symbolic"}}
    assert row_label(base) == "m (DLM)"
    assert row_label(k4) == "m (DLM), 4-shot, self-consistency 5"
    res = {"gsm8k": {"acc": 0.1, "ci": [0.05, 0.2], "n": 10}}
    table = markdown_table([(base, res), (k4, res)])
    assert "| m (DLM) |" in table and "| m (DLM), 4-shot, self-consistency 5 |" in table
    assert "4 solved examples before each question" in table and "temperature 0.7" in table
    assert "GSM8K in its symbolic form" in table
    assert table.count("solved examples") == 1     # the zero-shot run says nothing about shots


def test_shots_table_puts_each_model_and_task_on_a_row_with_one_column_per_k(tmp_path):
    from evals.report import shots_table, table_from_dirs
    from evals.store import write_json

    def run(kind, shots, samples, acc):
        s = {"kind": kind, "shots": shots, "samples": samples, "sample_temperature": 0.7}
        return {"model": "m", "settings": s}, {"triviaqa": {"em": acc, "em_ci": [0.0, 0.5], "n": 20}}
    runs = [run("ar", 0, 1, 0.0), run("ar", 4, 1, 0.25), run("dlm", 4, 1, 0.1), run("dlm", 4, 5, 0.2)]
    table = shots_table(runs)
    assert "| Model | Task | 0-shot | 4-shot |" in table
    assert "| m (AR) | TriviaQA (em) | 0.0 [0.0, 50.0] | 25.0 [0.0, 50.0] |" in table
    assert "| m (DLM) | TriviaQA (em) | – | 10.0 [0.0, 50.0] |" in table      # no 0-shot run: a dash
    assert "| m (DLM), self-consistency 5 | TriviaQA (em) | – | 20.0 [0.0, 50.0] |" in table
    with pytest.raises(ValueError, match="two runs give m \\(AR\\), triviaqa, 4-shot"):
        shots_table(runs + [run("ar", 4, 1, 0.3)])
    for i, (config, res) in enumerate(runs[:2]):       # the CLI's path reads the same from run directories
        (tmp_path / str(i)).mkdir()
        write_json(tmp_path / str(i) / "config.json", config)
        write_json(tmp_path / str(i) / "results.json", res)
    assert "| m (AR) | TriviaQA (em) | 0.0 [0.0, 50.0] | 25.0 [0.0, 50.0] |" in table_from_dirs(
        [tmp_path / "0", tmp_path / "1"], by="shots")


def test_gsm8k_answer_stops_at_the_next_question_and_rescore_rereads_stored_generations(tmp_path):
    from evals.cli import main
    from evals.store import read_json, write_json
    # a few-shot prompt invites the model to pose the next problem: its numbers are not the answer
    assert gsm8k_prediction(" <<2*3=6>> #### 6\n\nQuestion: Tom has 40 apples") == "6"
    assert gsm8k_prediction(" 16 - 3 = 13\nQuestion: what is 5 + 9?") == "13"
    from evals.tasks import majority
    assert majority(["7", None, "8", "8 ", "7"]) == "7"          # a tie goes to the first given
    assert majority([None, ""]) is None
    # records written under the old rule (the next question's number read as the answer) are corrected in place
    out = tmp_path / "run"
    (out / "predictions").mkdir(parents=True)
    recs = [{"id": 0, "raw": " <<2*3=6>>\n\nQuestion: Sam has 40", "answer": "6", "pred": "40", "acc": 0.0},
            {"id": 1, "raw": [" 5 #### 5", " 4\nQuestion: 5", " #### 4"], "answer": "4", "pred": "5", "acc": 0.0},
            {"id": 2, "raw": " #### 9", "answer": "8", "pred": "9", "acc": 0.0},
            {"id": 3, "raw": " #### 8", "answer": "8", "pred": "8", "acc": 1.0}]   # outside the run's slice
    (out / "predictions" / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    write_json(out / "config.json", {"model": "m", "settings": {"kind": "ar"}, "examples": {"gsm8k": [0, 2]}})
    write_json(out / "results.json", {"gsm8k": {"acc": 0.0, "n": 3}})
    assert main(["rescore", str(out)]) == 0
    res = read_json(out / "results.json")["gsm8k"]
    assert res["n"] == 3 and res["acc"] == pytest.approx(2 / 3) and res["ci"][0] < 2 / 3 < res["ci"][1]
    rows = [json.loads(line) for line in (out / "predictions" / "gsm8k.jsonl").read_text().splitlines()]
    assert [r["pred"] for r in rows] == ["6", "4", "9", "8"] and rows[1]["raw"] == recs[1]["raw"]
    assert "66.7" in (out / "table.md").read_text()
