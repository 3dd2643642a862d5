"""Few-shot in-context evaluation (the paper's TriviaQA / GSM8K k-shot and self-consistency): which examples go
before a question, that the prompt holds them, and how the majority answer is chosen."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from evals import data as D
from evals.eval_model import EvalModel, EvalSettings
from evals.metrics import first_answer_span
from evals.tasks import answers, eval_gsm8k, eval_qa, get_task


def _qa(n=6):
    return [D.QAExample(i, f"Question: q{i}?\nAnswer:", f"a{i}", [f"a{i}"]) for i in range(n)]


def test_shots_are_seeded_distinct_and_never_the_question_itself():
    picks = [D.shot_indices(6, 3, seed=0, example_id=i, exclude_same=True) for i in range(6)]
    assert picks == [D.shot_indices(6, 3, seed=0, example_id=i, exclude_same=True) for i in range(6)]   # reruns
    assert all(len(set(p)) == 3 and i not in p for i, p in enumerate(picks))
    assert picks != [D.shot_indices(6, 3, seed=1, example_id=i, exclude_same=True) for i in range(6)]


def test_qa_prompt_holds_k_answered_questions_then_the_question():
    plain = _qa()
    shot = D.with_qa_shots(plain, 2, seed=0)
    for ex, orig in zip(shot, plain):
        blocks = ex.prompt.split("\n\n")
        assert len(blocks) == 3 and blocks[-1] == orig.prompt and ex.aliases == orig.aliases
        for block in blocks[:2]:
            q = int(block.split("?")[0].split("q")[-1])
            assert q != ex.id and block == f"{plain[q].prompt} a{q}"
    assert D.with_qa_shots(plain, 0, seed=0) is plain


def test_gsm8k_shots_come_from_the_train_split():
    test = [D.MathExample(i, f"t{i}", "s #### 1", "1") for i in range(3)]
    train = [D.MathExample(i, f"train{i}", f"sol{i} #### {i}", str(i)) for i in range(5)]
    shot = D.with_gsm8k_shots(test, train, 2, seed=0)
    for ex in shot:
        assert ex.shots.count("Question: train") == 2 and ex.shots.endswith("\n\n") and "Question: t0" not in ex.shots


def test_gsm8k_symbolic_form_in_shots_and_oracle_length(shared_data):
    """--gsm8k-format symbolic: solutions (the shots, the oracle length) are only the <<...>> equations and
    #### answer, the form the gsm8k-sft presets train on; the gold answer is the same number."""
    from dlm.formats import gsm8k_symbolic
    assert gsm8k_symbolic("Half is 48/2 = <<48/2=24>>24.\nSo 48+24 = <<48+24=72>>72 in all.\n#### 72") == \
        "<<48/2=24>> <<48+24=72>> #### 72"
    assert gsm8k_symbolic("No calculator here.\n#### 5") == "#### 5"
    if not (shared_data / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("gsm8k absent")
    s = EvalSettings(gsm8k_format="symbolic", shots=2)
    full, sym = (get_task("gsm8k").load(shared_data, EvalSettings(gsm8k_format=f, shots=2))[:20]
                 for f in ("full", "symbolic"))
    for a, b in zip(full, sym):
        assert a.answer == b.answer and b.solution == gsm8k_symbolic(a.solution) and len(b.solution) < len(a.solution)
        assert b.shots.count("Question: ") == 2 and "<<" in b.shots and "\n#### " not in b.shots
    with pytest.raises(ValueError, match="gsm8k_format"):
        EvalSettings(gsm8k_format="latex")
    assert s.gsm8k_format == "symbolic"


class _Scripted:
    """A stand-in EvalModel whose generations are scripted: records every call."""

    def __init__(self, texts, samples=1):
        self.texts, self.calls = list(texts), []
        self.s = SimpleNamespace(samples=samples, sample_temperature=0.7, oracle_length=True, max_new_tokens=None,
                                 seed=0, chat=False)

    def n_tokens(self, text):
        return 3

    def complete(self, prompt, n, seed, temperature=0.0, top_p=1.0, messages=None):
        self.calls.append((prompt, seed, temperature))
        return SimpleNamespace(text=self.texts.pop(0))


def test_self_consistency_takes_the_majority_and_greedy_takes_one():
    b = _Scripted([" Paris.", " paris", " London", " Paris, France"], samples=4)
    pred, raw = answers(b, "Q", 3, 100, first_answer_span)
    assert normalize(pred) == "paris" and len(raw) == 4
    assert [c[1] for c in b.calls] == [100, 101, 102, 103] and all(c[2] == 0.7 for c in b.calls)
    tie = _Scripted([" Rome", " Oslo"], samples=2)
    assert answers(tie, "Q", 3, 0, first_answer_span)[0] == "Rome"      # a tie: the first sampled
    greedy = _Scripted([" Oslo"])
    assert answers(greedy, "Q", 3, 0, first_answer_span)[0] == "Oslo" and greedy.calls[0][2] == 0.0


def normalize(text):
    from evals.metrics import normalize_answer
    return normalize_answer(text)


def test_eval_functions_put_the_shots_in_the_prompt():
    b = _Scripted([" a1"])
    ex = D.with_qa_shots(_qa(), 2, seed=0)[1]
    assert eval_qa(b, ex)["em"] == 1.0 and b.calls[0][0] == ex.prompt
    g = _Scripted([" so 2 #### 2"])
    ex = D.MathExample(0, "What is 1+1?", "1+1=2 #### 2", "2", shots="Question: x\nAnswer: y #### 3\n\n")
    assert eval_gsm8k(g, ex)["acc"] == 1.0
    assert g.calls[0][0] == "Question: x\nAnswer: y #### 3\n\nQuestion: What is 1+1?\nAnswer:"


def test_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="shots must be >= 0"):
        EvalSettings(shots=-1)
    with pytest.raises(ValueError, match="samples >= 1"):
        EvalSettings(samples=0)


def test_k_shot_triviaqa_on_real_data_with_a_tiny_model(tiny_dlm, shared_data):
    spec = get_task("triviaqa")
    settings = EvalSettings(kind="dlm", shots=4, samples=3, sampler={"decoder": "full", "steps": 2})
    examples = spec.load(shared_data, settings)[:2]
    assert all(ex.prompt.count("\nAnswer:") == 5 for ex in examples)   # 4 answered + the question
    record = spec.evaluate(EvalModel(tiny_dlm, settings), examples[0])
    assert isinstance(record["raw"], list) and len(record["raw"]) == 3 and record["em"] in (0.0, 1.0)
