"""End to end on the real SmolLM2-135M: 20 PIQA items through the AR path and the (un-adapted) DLM path.

The accuracies are printed (run with -s) for the report; they are not asserted: 20 items say little, and the
un-adapted DLM row is a baseline expected near chance.
"""
from __future__ import annotations

import json
import math

import pytest

from evals import data as D
from evals.eval_model import EvalSettings
from evals.runner import evaluate
from evals.tasks import TASKS


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ar", "dlm"])
def test_piqa_20_items_real_smollm2(smollm2, shared_data, tmp_path, kind):
    examples = D.load_piqa(shared_data)[:20]
    settings = EvalSettings(kind=kind, n_samples=8)
    res = evaluate(smollm2, [(TASKS["piqa"], examples)], tmp_path, settings, model_id="smollm2-135m",
                   progress=False)["piqa"]
    print(f"\nSmolLM2-135M {kind.upper()} PIQA n={res['n']}: acc {res['acc']:.3f} ± {res['stderr']:.3f}, "
          f"acc_norm {res.get('acc_norm', float('nan')):.3f}")
    assert res["n"] == 20 and 0.0 <= res["acc"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "predictions" / "piqa.jsonl").read_text().splitlines()]
    assert len(records) == 20
    for r in records:
        assert len(r["logprobs"]) == 2 and all(math.isfinite(x) and x < 0 for x in r["logprobs"])
        assert r["acc"] == float(r["pred"] == r["gold"])
        if kind == "dlm":
            assert all(s > 0 for s in r["stderrs"])  # Monte-Carlo estimates carry an error bar
