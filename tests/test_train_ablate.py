"""train/ablate.py on the tiny-cpu preset: each variant is a real run with exactly its switch flipped, all variants
see the same tokens and are scored on the same held-out masks, and a re-run resumes/skips instead of retraining."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train import ablate

REPO = Path(__file__).resolve().parent.parent


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ablation_runs_each_switch_on_the_same_tokens_and_tabulates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "abl"
    args = ["--config", "tiny-cpu", "--variants", "adapted,no-anneal,no-shift", "--max-steps", "6", "--out", str(out),
            "run.eval_every=3", "run.save_every=3", "run.progress=false", "run.tensorboard=false",
            f"data.cache_dir={tmp_path / 'cache'}"]
    assert ablate.main(args) == 0

    summaries = {v: json.loads((out / v / "run_summary.json").read_text())
                 for v in ("adapted", "no-anneal", "no-shift")}
    assert summaries["adapted"]["anneal_steps"] == 10 and summaries["adapted"]["shift"] is True
    assert summaries["no-anneal"]["anneal_steps"] == 0 and summaries["no-anneal"]["shift"] is True
    assert summaries["no-shift"]["shift"] is False and summaries["no-shift"]["anneal_steps"] == 10
    assert len({s["tokens_seen"] for s in summaries.values()}) == 1                 # same token budget
    assert len({s["data_info"]["cache"] for s in summaries.values()}) == 1          # from the same token file

    ratios = {v: [r["anneal_ratio"] for r in _metrics(out / v) if "anneal_ratio" in r] for v in summaries}
    assert all(r < 1.0 for r in ratios["adapted"]) and all(r == 1.0 for r in ratios["no-anneal"])

    evals = {v: [r for r in _metrics(out / v) if "eval/acc@0.5" in r] for v in summaries}
    assert [r["step"] for r in evals["adapted"]] == [0, 3, 6]
    # identical start and identical held-out masks: the runs differ only by what training does ...
    assert evals["adapted"][0] == evals["no-anneal"][0]
    # ... while the shift changes what each hidden state is read as, so even step 0 differs
    assert evals["no-shift"][0]["eval/elbo_nll"] != evals["adapted"][0]["eval/elbo_nll"]

    table = (out / "ablation.md").read_text()
    for v in summaries:
        assert f"| {v} | 6 |" in table
    rows = json.loads((out / "ablation.json").read_text())
    assert rows["no-anneal"]["last"]["eval/acc@0.5"] == evals["no-anneal"][-1]["eval/acc@0.5"]
    assert (out / "ablation.html").is_file()

    # a second call trains nothing: finished variants are skipped, their results are kept as they are
    before = {v: (out / v / "metrics.jsonl").read_text() for v in summaries}
    capsys.readouterr()
    assert ablate.main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3
    assert before == {v: (out / v / "metrics.jsonl").read_text() for v in summaries}


def test_unknown_variant_is_refused(tmp_path, capsys):
    assert ablate.main(["--config", "tiny-cpu", "--variants", "adapted,no-sense", "--out", str(tmp_path)]) == 2
    assert "no-sense" in capsys.readouterr().err


@pytest.mark.parametrize("variant", list(ablate.VARIANTS))
def test_every_variant_names_valid_config_overrides(variant):
    from train.config import load_config, validate
    cfg = load_config("smollm2-135m", ablate.VARIANTS[variant])
    validate(cfg, "pretrain")                         # e.g. scratch must switch LoRA off or validation refuses it
