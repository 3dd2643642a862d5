"""The lm-evaluation-harness adapter on one small local task (skipped when lm-eval is not installed)."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")

TASK_YAML = """\
task: tiny_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

ROWS = [
    {"context": "Question: What color is the sky on a clear day?\nAnswer:", "choices": ["blue", "green"], "gold": 0},
    {"context": "Question: How many legs does a cat have?\nAnswer:", "choices": ["two", "four"], "gold": 1},
    {"context": "Question: What do bees make?\nAnswer:", "choices": ["honey", "steel"], "gold": 0},
]


@pytest.mark.parametrize("kind", ["ar", "dlm"])
def test_simple_evaluate_on_a_local_task(tmp_path, tiny_dlm, kind, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evals.lm_eval_model import DLMHarnessLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_local_mc.yaml").write_text(TASK_YAML.format(data=data))
    lm = DLMHarnessLM(model=tiny_dlm, kind=kind, n_samples=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_local_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                              include_defaults=False))
    res = out["results"]["tiny_local_mc"]
    acc = res["acc,none"]
    assert 0.0 <= acc <= 1.0 and not math.isnan(acc)
    samples = out["samples"]["tiny_local_mc"]
    assert len(samples) == 3 and all(len(s["resps"]) == 2 for s in samples)  # one log-likelihood per choice


def test_direct_calls_match_backend(tiny_dlm):
    from lm_eval.api.instance import Instance

    from evals.eval_model import EvalModel, EvalSettings
    from evals.lm_eval_model import DLMHarnessLM

    lm = DLMHarnessLM(model=tiny_dlm, kind="ar")
    req = Instance(request_type="loglikelihood", doc={}, arguments=("The sky is", " blue"), idx=0)
    (logprob, greedy), = lm.loglikelihood([req], disable_tqdm=True)
    assert logprob == pytest.approx(tiny_dlm.ar_score("The sky is", " blue").logprob, abs=1e-3)
    assert isinstance(greedy, bool)
    gen = Instance(request_type="generate_until", doc={}, idx=0,
                   arguments=("Once upon a time", {"until": ["\n"], "max_gen_toks": 6}))
    (text,) = lm.generate_until([gen], disable_tqdm=True)
    full = EvalModel(tiny_dlm, EvalSettings(kind="ar")).complete("Once upon a time", 6, lm._seed("Once upon a time"))
    assert text == full.text.split("\n")[0]
    roll = Instance(request_type="loglikelihood_rolling", doc={}, idx=0, arguments=("A short text to score.",))
    (ll,) = lm.loglikelihood_rolling([roll], disable_tqdm=True)
    assert ll < 0 and math.isfinite(ll)
