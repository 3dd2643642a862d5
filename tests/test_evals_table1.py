"""The generation columns of Table 1 (TriviaQA, HumanEval single-line infilling, GSM8K) end to end on the real
files in ../shared/data (skipped without it): 2-3 examples each through the CLI with a tiny random model, AR and
DLM paths, and the sandbox on the real HumanEval programs (the canonical middle line passes, a wrong one fails)."""
from __future__ import annotations

import json

import pytest

from evals import data as D
from evals.cli import main as evals_main
from evals.execution import humaneval_program, run_program
from evals.metrics import gsm8k_gold

TASKS = "triviaqa,triviaqa_full,humaneval_infill,gsm8k"


def test_real_humaneval_programs_pass_with_the_canonical_line_and_fail_without(shared_data):
    for ex in D.load_humaneval_infill(shared_data)[:3]:
        args = (ex.meta["test"], ex.meta["entry_point"])
        assert run_program(humaneval_program(ex.prefix, ex.target, ex.suffix, *args)).passed, ex.meta["task_id"]
        wrong = run_program(humaneval_program(ex.prefix, "    raise ValueError('wrong line')\n", ex.suffix, *args))
        assert not wrong.passed and wrong.status == "failed", ex.meta["task_id"]


def test_real_files_parse(shared_data):
    qa = D.load_triviaqa(shared_data)
    assert len(qa) == 3000 and qa[0].prompt.startswith("Question:") and qa[0].aliases
    full = D.load_triviaqa_full(shared_data)
    assert len(full) == 11313 and all(ex.aliases for ex in full[:50])
    math_ = D.load_gsm8k(shared_data)
    assert len(math_) == 1319 and math_[0].answer == gsm8k_gold(math_[0].solution)
    assert len(D.load_humaneval_infill(shared_data)) == 1033


@pytest.mark.parametrize("kind", ["ar", "dlm"])
def test_generation_tasks_end_to_end_on_real_data(shared_data, tmp_path, tiny_llama_dir, kind):
    out = tmp_path / "out"
    args = ["--model", str(tiny_llama_dir), "--kind", kind, "--tasks", TASKS, "--limit", "2", "--data-dir",
            str(shared_data), "--out", str(out), "--no-progress", "--device", "cpu", "--exec-timeout", "5"]
    assert evals_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    for task, metric in (("triviaqa", "em"), ("triviaqa_full", "em"), ("humaneval_infill", "pass@1"),
                         ("gsm8k", "acc")):
        res = results[task]
        assert res["n"] == 2 and res[metric] in (0.0, 0.5, 1.0), task
        assert res["ci_method"][metric] == "wilson" and 0.0 <= res["ci"][0] <= res[metric] <= res["ci"][1] <= 1.0
    code = [json.loads(line) for line in (out / "predictions" / "humaneval_infill.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in code] == ["SingleLineInfilling/HumanEval/0/L0", "SingleLineInfilling/HumanEval/0/L1"]
    assert all(r["status"] in ("passed", "failed", "timeout") and r["completion"].endswith("\n") for r in code)
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["gsm8k"]["gsm8k/test.jsonl"]["sha256"].startswith("3730d312f6e34405")  # SOURCES.md
    assert config["data"]["humaneval_infill"]["humaneval_infilling/HumanEval-SingleLineInfilling.jsonl.gz"][
        "sha256"].startswith("1277073e7ddce163")
