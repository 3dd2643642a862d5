"""95% intervals and reproducibility records of evals/: the Wilson interval against published values, the seeded
bootstrap, the data files' SHA-256 in the run's config.json (and a rerun on changed data refused), and the
HellaSwag task on a fixture in the dataset's own JSONL format."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evals import data as D
from evals.cli import main as evals_main
from evals.metrics import bootstrap_interval, wilson_interval
from evals.store import ConfigMismatch, data_changes, prepare_out_dir
from evals.tasks import aggregate, get_task, mc_file_spec

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HELLASWAG = FIXTURES / "hellaswag_val_sample.jsonl"


# ----- Wilson score interval ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n, lo, hi", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score without continuity correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    # statsmodels proportion_confint(3, 4, method="wilson")
    (3, 4, 0.300642, 0.954413),
])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5)


def test_wilson_interval_edges_and_scipy():
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(20, 20)[0] == pytest.approx(1 - 0.1611, abs=5e-5)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)
    stats = pytest.importorskip("scipy.stats")
    ref = stats.binomtest(137, 200).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(137, 200) == pytest.approx((ref.low, ref.high), abs=1e-9)


# ----- bootstrap ----------------------------------------------------------------------------------------------------
def test_bootstrap_is_deterministic_for_a_seed_and_brackets_the_mean():
    values = [float((7 * i) % 11) for i in range(60)]
    a, b = bootstrap_interval(values, seed=3), bootstrap_interval(values, seed=3)
    assert a == b
    assert bootstrap_interval(values, seed=4) != a
    mean = sum(values) / len(values)
    assert a[0] < mean < a[1]
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.2)   # close to the normal interval for a mean
    assert all(math.isnan(x) for x in bootstrap_interval([1.0]))


def test_bootstrap_of_a_corpus_statistic_resamples_whole_rows():
    rows = [(2.0 * (1 + i % 3), 2) for i in range(30)]          # (nll, tokens): per-token NLL 1, 2 or 3
    lo, hi = bootstrap_interval(rows, lambda r: math.exp(r[:, 0].sum() / r[:, 1].sum()), seed=0)
    assert math.exp(1) < lo < math.exp(2) < hi < math.exp(3)


def test_aggregates_pick_wilson_for_proportions_and_the_bootstrap_otherwise():
    records = [{"id": i, "acc": float(i % 2), "acc_norm": 1.0, "rouge1": 10.0 * i} for i in range(10)]
    res = aggregate(get_task("piqa"), records)
    assert res["ci_method"] == {"acc": "wilson", "acc_norm": "wilson"}
    assert res["acc_ci"] == pytest.approx(list(wilson_interval(5, 10)))
    assert res["acc_norm_ci"][1] == 1.0 and res["acc_norm_ci"][0] < 1.0   # 10 / 10 still has an interval
    story = aggregate(get_task("rocstories"), [{"id": i, "rouge1": 10.0 * i, "rouge2": 1.0, "rougeL": 5.0}
                                                for i in range(10)])
    assert story["ci_method"]["rouge1"].startswith("bootstrap") and story["ci"] == story["rouge1_ci"]
    assert story["rouge1_ci"] == aggregate(get_task("rocstories"), [{"id": i, "rouge1": 10.0 * i, "rouge2": 1.0,
                                                                     "rougeL": 5.0} for i in range(10)])["rouge1_ci"]
    ppl = aggregate(get_task("elbo_ppl"), [{"id": i, "nll": 10.0 + i, "n_tokens": 5, "nll_per_token": (10.0 + i) / 5}
                                          for i in range(8)])
    assert ppl["ppl_ci"][0] < ppl["ppl"] < ppl["ppl_ci"][1]


# ----- data hashes --------------------------------------------------------------------------------------------------
def test_recorded_hashes_change_when_the_data_changes(tmp_path):
    f = tmp_path / "d" / "piqa" / "valid.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (f.parent / "valid-labels.lst").write_text("0\n")
    with D.recording_files() as read:
        D.load_piqa(tmp_path / "d")
    assert read == [f, f.parent / "valid-labels.lst"]
    before = D.file_fingerprints(read, tmp_path / "d")
    assert before["piqa/valid.jsonl"]["sha256"] == D.sha256_file(f) and len(D.sha256_file(f)) == 64
    f.write_text('{"goal": "g", "sol1": "a", "sol2": "c"}\n')       # same size, other bytes
    after = D.file_fingerprints(read, tmp_path / "d")
    assert after["piqa/valid.jsonl"]["sha256"] != before["piqa/valid.jsonl"]["sha256"]
    assert after["piqa/valid-labels.lst"] == before["piqa/valid-labels.lst"]
    assert data_changes({"piqa": before}, {"piqa": after}) == [
        f"piqa data piqa/valid.jsonl: sha256 {before['piqa/valid.jsonl']['sha256'][:12]} -> "
        f"{after['piqa/valid.jsonl']['sha256'][:12]}"]
    assert data_changes({"piqa": before}, {"siqa": after}) == []     # other tasks: nothing to compare

    out = tmp_path / "out"
    cfg = {"model": "m", "settings": {"kind": "ar"}}
    prepare_out_dir(out, {**cfg, "data": {"piqa": before}})
    prepare_out_dir(out, {**cfg, "data": {"siqa": after}})           # a new task: hashes merged, not refused
    assert set(json.loads((out / "config.json").read_text())["data"]) == {"piqa", "siqa"}
    with pytest.raises(ConfigMismatch, match="piqa data piqa/valid.jsonl: sha256"):
        prepare_out_dir(out, {**cfg, "data": {"piqa": after}})


def test_cli_refuses_to_resume_on_changed_data(tmp_path, tiny_llama_dir, capsys):
    task = tmp_path / "mini.jsonl"
    task.write_text(json.dumps({"context": "2 + 2 =", "choices": ["4", "5"], "gold": 0}) + "\n")
    args = ["--model", str(tiny_llama_dir), "--kind", "ar", "--tasks", "", "--task-file", str(task),
            "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    assert evals_main(args) == 0
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["data"]["mini"]
    assert list(recorded.values())[0]["sha256"] == D.sha256_file(task)
    task.write_text(json.dumps({"context": "2 + 3 =", "choices": ["5", "6"], "gold": 0}) + "\n")
    assert evals_main(args) == 1
    assert "mini data" in capsys.readouterr().err


# ----- HellaSwag ----------------------------------------------------------------------------------------------------
def _hellaswag_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data" / "hellaswag"
    d.mkdir(parents=True)
    (d / "hellaswag_val.jsonl").write_bytes(HELLASWAG.read_bytes())
    return tmp_path / "data"


def test_hellaswag_reads_the_dataset_fields_with_lm_eval_preprocessing(tmp_path):
    ex = D.load_hellaswag(_hellaswag_dir(tmp_path))
    assert [e.gold for e in ex] == [2, 1, 0]                        # int and string labels
    assert ex[0].contexts[0] == "Making tea: A man fills a kettle with water and sets it on the stove. He"
    assert ex[0].continuations[2] == " waits for the water to boil and pours it over a tea bag."
    # WikiHow artifacts: " [title]" becomes ". ", other [brackets] go, ctx_b is capitalized() (rest lower-cased)
    assert ex[1].contexts[0] == "Home and Garden: How to water a houseplant. Check the soil first. push a finger " \
                                "into the soil."
    assert ex[1].continuations[1] == " If the top inch feels dry, it is time to water. Pour slowly until water " \
                                     "drains out."
    assert ex[1].continuations[3] == " Cover the pot with a thick blanket. forever."
    assert D.load_mc_file(HELLASWAG) == ex                          # --task-file recognises the format
    spec = mc_file_spec(HELLASWAG)                                    # ... and makes it Table 1's HellaSwag column
    assert (spec.name, spec.title, spec.load(tmp_path, None)) == ("hellaswag", "HellaS.", ex)
    generic = tmp_path / "mine.jsonl"
    generic.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "gold": 1}) + "\n")
    assert mc_file_spec(generic).name == "mine"


def test_hellaswag_bad_records_name_the_field(tmp_path):
    bad = tmp_path / "hs.jsonl"
    row = json.loads(HELLASWAG.read_text().splitlines()[0])
    bad.write_text(json.dumps({**row, "label": 7}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: 'label' must be an index into endings \(0..3\)"):
        D.load_mc_file(bad)
    del row["label"]
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="line 1: missing key.*label.*test split has no labels"):
        D.load_mc_file(bad)
    with pytest.raises(D.MissingDataError, match="hellaswag/hellaswag_val.jsonl.*--data-dir"):
        D.load_hellaswag(tmp_path)


@pytest.mark.parametrize("kind", ["ar", "dlm"])
def test_hellaswag_end_to_end_on_a_tiny_model(tmp_path, tiny_llama_dir, kind):
    out = tmp_path / "out"
    args = ["--model", str(tiny_llama_dir), "--kind", kind, "--tasks", "hellaswag", "--data-dir",
            str(_hellaswag_dir(tmp_path)), "--out", str(out), "--n-samples", "2", "--no-progress", "--device", "cpu"]
    assert evals_main(args) == 0
    res = json.loads((out / "results.json").read_text())["hellaswag"]
    assert res["n"] == 3 and res["ci_method"] == {"acc": "wilson", "acc_norm": "wilson"}
    assert res["acc_ci"] == pytest.approx(list(wilson_interval(round(res["acc"] * 3), 3)))
    assert res["ci"] == res["acc_norm_ci"]                          # the column is acc_norm, as lm-eval's headline
    table = (out / "table.md").read_text()
    assert "| HellaS. (acc_norm) |" in table and f"| {100 * res['acc_norm']:.1f} [" in table
    assert "data sha256 hellaswag/hellaswag_val.jsonl " + D.sha256_file(HELLASWAG)[:12] in table
    records = [json.loads(line) for line in (out / "predictions" / "hellaswag.jsonl").read_text().splitlines()]
    assert [len(r["logprobs"]) for r in records] == [4, 4, 4]


def test_hellaswag_cell_falls_back_to_acc_and_says_so():
    from evals.report import format_cell
    assert format_cell("hellaswag", {"acc": 0.5, "acc_ci": [0.2, 0.8]}) == "50.0 [20.0, 80.0] (acc)"
    assert format_cell("hellaswag", {"acc": 0.5, "acc_norm": 0.75, "acc_norm_ci": [0.3, 0.95]}) == "75.0 [30.0, 95.0]"


def test_a_second_run_into_a_directory_keeps_the_first_runs_hashes_examples_and_command(tmp_path):
    from evals.store import prepare_out_dir, read_json
    s = {"kind": "ar"}
    first = {"model": "m", "dtype": "float32", "settings": s, "command": ["evals", "--tasks", "piqa"],
             "data": {"piqa": {"piqa/dev.jsonl": {"sha256": "a" * 64}}}, "examples": {"piqa": [0, 9]}}
    second = {"model": "m", "dtype": "float32", "settings": s, "command": ["evals", "--tasks", "siqa"],
              "data": {"siqa": {"siqa/dev.jsonl": {"sha256": "b" * 64}}}, "examples": {"siqa": [0, 4]}}
    prepare_out_dir(tmp_path, first)
    prepare_out_dir(tmp_path, second)
    prepare_out_dir(tmp_path, second)          # the same command again (a resume) is not listed twice
    config = read_json(tmp_path / "config.json")
    assert set(config["data"]) == {"piqa", "siqa"} and config["examples"] == {"piqa": [0, 9], "siqa": [0, 4]}
    assert config["command"] == second["command"] and config["earlier_commands"] == [first["command"]]


def test_mcnemar_exact_is_the_two_sided_binomial_test_on_the_discordant_pairs():
    from evals.metrics import mcnemar_exact
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)          # 2 * 0.5**5, by hand
    assert mcnemar_exact(0, 5) == mcnemar_exact(5, 0)
    stats = pytest.importorskip("scipy.stats")
    for b, a in [(9, 6), (33, 38), (20, 5), (1, 12)]:
        assert mcnemar_exact(b, a) == pytest.approx(stats.binomtest(b, b + a, 0.5).pvalue, rel=1e-9)


def test_paired_difference_cancels_what_both_share_and_counts_discordant_pairs():
    from evals.metrics import bootstrap_interval, paired_difference
    a = [1, 1, 0, 0, 1, 0, 1, 0] * 25
    b = [1, 1, 0, 0, 1, 0, 0, 1] * 25              # the same except two examples per block swap
    d = paired_difference(a, b)
    assert d["n"] == 200 and d["diff"] == pytest.approx(0.0) and d["a"] == d["b"] == 0.5
    assert d["b_only"] == 25 and d["a_only"] == 25 and d["p_mcnemar"] == 1.0
    lo, hi = d["ci"]
    assert lo < 0 < hi
    # pairing: the interval of the difference is narrower than an unpaired one would be (both share 6 of 8)
    ua, ub = bootstrap_interval(a), bootstrap_interval(b)
    assert hi - lo < (ua[1] - ua[0]) + (ub[1] - ub[0])
    better = paired_difference(a, [1] * 200)
    assert better["diff"] == pytest.approx(0.5) and better["ci"][0] > 0.4 and better["a_only"] == 0
    assert better["p_mcnemar"] < 1e-20
    r = paired_difference([10.0, 20.0, 30.0], [12.0, 21.0, 33.0])       # ROUGE-like scores: no McNemar
    assert r["diff"] == pytest.approx(2.0) and "p_mcnemar" not in r
    with pytest.raises(ValueError, match="3 scores against 2"):
        paired_difference([1, 0, 1], [1, 0])


def test_evals_compare_pairs_two_runs_by_example_id(tmp_path):
    from evals.cli import main
    from evals.store import write_json
    for name, kind, accs in (("a", "ar", [1, 0, 0, 1, 0]), ("b", "dlm", [1, 1, 0, 1, 1, 1])):
        d = tmp_path / name
        (d / "predictions").mkdir(parents=True)
        write_json(d / "config.json", {"model": "m", "settings": {"kind": kind}})
        write_json(d / "results.json", {"piqa": {"acc": sum(accs) / len(accs), "n": len(accs)}})
        (d / "predictions" / "piqa.jsonl").write_text(
            "".join(f'{{"id": {i}, "acc": {v}.0}}\n' for i, v in enumerate(accs)) + '{"id": 9, "ac', encoding="utf-8")
    out = tmp_path / "cmp.md"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    text = out.read_text()
    # ids 0-4 in both (b's id 5 and the torn last lines are left out): A 2/5, B 4/5, B alone right on 1 and 4
    assert "| PIQA | acc | 5 | 40.0 | 80.0 | 40.0 [" in text and "| 2 / 0 | 0.500 |" in text
    assert (tmp_path / "a" / "predictions" / "piqa.jsonl").read_text().endswith('"ac')   # read, never rewritten
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2


def test_paired_proportion_interval_covers_and_agrees_with_mcnemar_when_few_examples_differ():
    import numpy as np

    from evals.metrics import mcnemar_exact, paired_proportion_interval
    # B wrong on 4 of 1,033 problems that A passes, never the other way: the bootstrap's interval excluded 0 here,
    # while McNemar's p is 0.125; the score interval holds 0 too
    lo, hi = paired_proportion_interval(23, 4, 0, 1006)
    assert lo < 0 < hi and mcnemar_exact(0, 4) > 0.05
    lo, hi = paired_proportion_interval(5, 0, 25, 170)        # 25 : 0 discordant: clearly apart
    assert 0 < lo < 25 / 200 < hi and mcnemar_exact(25, 0) < 1e-6
    a, b = paired_proportion_interval(10, 15, 5, 20), paired_proportion_interval(10, 5, 15, 20)
    assert a == pytest.approx((-b[1], -b[0]))                 # swapping the models mirrors the interval
    assert paired_proportion_interval(0, 0, 0, 10)[0] < 0 < paired_proportion_interval(0, 0, 0, 10)[1]
    # coverage of the true difference at the nominal 95%, including a rare-event table like GSM8K's
    rng = np.random.default_rng(1)
    for probs, n in (((0.02, 0.03, 0.01, 0.94), 200), ((0.3, 0.1, 0.15, 0.45), 100)):
        true = probs[2] - probs[1]
        hits = sum(lo <= true <= hi for lo, hi in (paired_proportion_interval(*rng.multinomial(n, probs))
                                                   for _ in range(1000)))
        assert hits >= 930, (probs, hits)
