"""bench/decode.py and the `python -m bench` entry point on a tiny random model (no timing asserts)."""
from __future__ import annotations

import math

import pytest
import torch


def test_decode_quick_rows_and_chart(tmp_path, tiny_llama_dir, capsys):
    from bench import decode
    out = tmp_path / "decode.html"
    rows = decode.main(["--quick", "--model", str(tiny_llama_dir), "--device", "cpu", "--dtype", "float32",
                        "--variants", "T=L/2,T=L/4,thr0.9,blocks4+thr0.9", "--out", str(out)])
    assert [(r.method, r.length) for r in rows] == [(m, L) for L in (16, 32) for m in ("AR", "T=L/2", "T=L/4",
                                                                                       "thr0.9", "blocks4+thr0.9")]
    for r in rows:
        assert r.seconds > 0 and r.tokens_per_s > 0
        assert math.isnan(r.gen_ppl) or r.gen_ppl > 1.0
        assert r.tokens == r.length  # every row writes exactly L tokens (EOS suppressed), so speeds compare
        assert r.vs_ar > 0 and (r.method != "AR" or r.vs_ar == 1.0)
        if r.method == "AR":
            assert r.nfe == r.tokens
        elif r.method.startswith("T="):
            assert r.nfe == r.steps == {"T=L/2": r.length // 2, "T=L/4": r.length // 4}[r.method]
        else:
            assert 1 <= r.nfe <= r.length  # threshold decoding never needs more than its planned steps
    html = out.read_text()
    assert "plotly" in html.lower() and "thr0.9" in html
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "gen-PPL" in printed


def test_decode_rejects_unknown_variant(tiny_llama_dir):
    from bench import decode
    with pytest.raises(SystemExit):
        decode.main(["--model", str(tiny_llama_dir), "--device", "cpu", "--variants", "nope", "--lengths", "8"])


def test_bench_entry_point_skips_missing_and_reports_failures(monkeypatch, capsys):
    import bench.__main__ as entry
    monkeypatch.setattr(entry, "BENCHMARKS", {"ghost": ("bench.no_such_benchmark", []),
                                              "bad": ("json", [])})  # json has no main(): fails
    code = entry.main([])
    out = capsys.readouterr().out
    assert "ghost       skipped" in out and "bench/no_such_benchmark.py is not present" in out
    assert "bad         failed" in out and code == 1


def test_continuation_table_compares_the_dlm_with_its_ar_twin(tiny_llama_dir):
    import dlm
    from bench import continuation
    model = dlm.load(tiny_llama_dir, device="cpu", dtype="float32")
    prompts = ["Once upon a time", "The old fisherman walked down to the"]
    result = continuation.run(model, model, model, prompts, new_tokens=6, log=lambda line: None)
    for side in ("dlm", "ar"):
        r = result[side]
        assert r["tokens"] >= 2 and r["seconds"] > 0 and 0 <= r["loops"] <= 1
        assert math.isnan(r["judge_ppl"]) or r["judge_ppl"] > 1.0
    assert result["speed"] > 0 and result["n"] == 2 and len(result["samples"]) == 2
    table = continuation.format_table(result)
    assert "judge-PPL" in table and "speed" in table and "goals" in table
    assert continuation.useful_tokens([5, 6, 2, 7], [2]) == 3 and continuation.useful_tokens([5, 6], [2]) == 2


def test_the_paired_ppl_ratio_interval_covers_equal_models_and_excludes_a_worse_one():
    import random

    from dlm.quality import ppl_ratio_interval
    rng = random.Random(0)
    base = [(rng.uniform(20, 60), 20) for _ in range(24)]             # per-prompt NLL, 20 tokens each
    same = ppl_ratio_interval(base, list(base))
    assert same[0] == pytest.approx(1.0) and same[1] <= 1.0 <= same[2]
    worse = [(nll + rng.uniform(4, 12), n) for nll, n in base]          # every prompt worse by 0.2-0.6 nats/token
    r, lo, hi = ppl_ratio_interval(worse, base)
    assert r > 1 and lo > 1.0 and lo <= r <= hi
    with pytest.raises(ValueError):
        ppl_ratio_interval(base, base[:3])


def test_continuation_dev_prompts_are_disjoint_from_the_reported_ones(shared_data):
    """Settings are chosen on --dev prompts; the reported run must not have seen them."""
    from bench import continuation
    test = continuation.load_prompts(shared_data, 24)
    dev = continuation.load_prompts(shared_data, 8, dev=True)
    assert len(test) == 24 and len(dev) == 8
    assert not set(test) & set(dev)


def test_cpu_step_bench_on_a_tiny_model(tiny_llama_dir, capsys):
    """bench.cpu_step: one row per weight format this machine has, each compared with fp32 in one run: fp32
    agrees with itself, bf16 reads half the bytes, the floor comes from the measured bandwidth."""
    from bench import cpu_step
    rows = {r["variant"]: r for r in cpu_step.main(["--model", str(tiny_llama_dir), "--steps", "3", "--rows", "2"])}
    assert rows["fp32"]["top1_agree"] == 1.0 and rows["fp32"]["vs_fp32"] == 1.0
    assert rows["bf16"]["weights_mb"] == pytest.approx(rows["fp32"]["weights_mb"] / 2, rel=1e-3)
    assert all(r["floor_ms"] > 0 and r["ms_1row"] > 0 and 0.0 <= r["top1_agree"] <= 1.0 for r in rows.values())
    assert "| fp32 |" in capsys.readouterr().out


def test_denoise_default_counts_tokens_decided_in_parallel_and_out_of_order():
    from bench.denoise_default import in_parallel, out_of_order
    from dlm.types import Frame
    M = 99
    frames = [Frame(step=1, total_steps=3, tokens=[1, M, 5, M], revealed=[2], confidence=[0.5], start=1),
              Frame(step=2, total_steps=3, tokens=[1, 4, 5, 6], revealed=[1, 3], confidence=[0.5, 0.5], start=1)]
    assert in_parallel(frames) == 2                 # only step 2 decided two at once
    assert out_of_order(frames, M) == (1, 3)        # pos 2 was decided while pos 1 was masked


def test_draft_acceptance_bench_on_a_tiny_model(tiny_llama_dir):
    """Tokens per forward lie in [1, B]; greedy drafts that equal the verifier's argmax would give B."""
    import dlm
    from bench.draft_acceptance import measure
    model = dlm.load(tiny_llama_dir, device="cpu", dtype="float32")
    rows = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    result = measure(model, rows, [2, 4], temperature=0.7, batch=2)
    for r in result:
        assert r["blocks"] == 4 * (32 // r["block_length"]) - 4      # block 0 holds position 0 (never a target)
        assert 1.0 <= r["tpf"] <= r["block_length"] and 1.0 <= r["tpf_greedy"] <= r["block_length"]
        assert 0.0 <= r["alpha_first"] <= 1.0
