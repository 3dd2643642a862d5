"""`train.self_distill`: the base's own continuations as a training corpus: each line is a prompt the benchmarks never
see plus what the base wrote after it; the prompts are fixed for a seed; a rerun appends only what is missing."""
from __future__ import annotations

import gzip
import json

import pytest

from train import self_distill


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "gutenberg").mkdir()
    words = " ".join(f"word{i}" for i in range(80))
    for name in ("book-a.txt.gz", "book-b.txt.gz", *self_distill.HELDOUT_BOOKS):
        text = "\n\n".join(f"{name} paragraph {k}: {words}" for k in range(6))
        with gzip.open(tmp_path / "gutenberg" / name, "wt", encoding="utf-8") as f:
            f.write(text)
    return tmp_path


def test_prompts_are_fixed_and_never_from_held_out_books(data_dir, tiny_dlm):
    a = self_distill.prompts(data_dir, tiny_dlm.tokenizer, n=8, chat_share=0.0, seed=1)
    b = self_distill.prompts(data_dir, tiny_dlm.tokenizer, n=8, chat_share=0.0, seed=1)
    assert a == b and len(a) == 8
    assert self_distill.prompts(data_dir, tiny_dlm.tokenizer, n=3, chat_share=0.0, seed=1) == a[:3]  # a prefix
    assert len({p["source"] for p in a[:2]}) == 2                                  # the books taken in turn
    assert {p["source"] for p in a} <= {"gutenberg/book-a.txt.gz", "gutenberg/book-b.txt.gz"}
    assert all(16 <= len(p["prompt"].split()) <= 48 for p in a)


def test_corpus_is_prompt_plus_continuation_and_a_rerun_appends_what_is_missing(data_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "sd.jsonl"

    def run(n):
        self_distill.main(["--model", str(tiny_llama_dir), "--out", str(out), "--data-dir", str(data_dir),
                           "--n", str(n), "--chat-share", "0", "--new-tokens", "5", "--batch", "4"])
        return [json.loads(line) for line in out.read_text().splitlines()]

    first = run(4)
    assert len(first) == 4
    rows = run(6)                      # the same prompt order: only the last 2 are new
    assert len(rows) == 6 and rows[:4] == first
    prompts = self_distill.prompts(data_dir, None, n=6, chat_share=0.0, seed=0)
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]
    for row in rows:
        assert row["text"] == row["prompt"] + row["continuation"] and row["continuation"]


def test_the_held_out_books_are_the_ones_every_diffusmol_config_excludes():
    """One list (`train.documents.HELDOUT_BOOKS`): the benchmarks' prompts, the self-distilled corpus's exclusions
    and the training configs' `data.exclude` cannot drift apart."""
    from train.config import load_config
    from train.documents import HELDOUT_BOOKS
    assert self_distill.HELDOUT_BOOKS is HELDOUT_BOOKS
    for name in ("diffusmol-v3", "diffusmol-v3-gpu"):
        assert sorted(load_config(name).data.exclude) == sorted(HELDOUT_BOOKS), name
