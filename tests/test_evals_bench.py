"""bench/decode.py and the `python -m bench` entry point on a tiny random model (no timing asserts)."""
from __future__ import annotations

import math

import pytest


def test_decode_quick_rows_and_chart(tmp_path, tiny_llama_dir, capsys):
    from bench import decode
    out = tmp_path / "decode.html"
    rows = decode.main(["--quick", "--model", str(tiny_llama_dir), "--device", "cpu", "--dtype", "float32",
                        "--variants", "T=L/2,T=L/4,thr0.9", "--out", str(out)])
    assert [(r.method, r.length) for r in rows] == [(m, L) for L in (16, 32) for m in ("AR", "T=L/2", "T=L/4",
                                                                                       "thr0.9")]
    for r in rows:
        assert r.seconds > 0 and r.tokens_per_s > 0
        assert math.isnan(r.gen_ppl) or r.gen_ppl > 1.0
        if r.method == "AR":
            assert r.nfe == r.tokens <= r.length  # one forward per new token; may stop at EOS
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
