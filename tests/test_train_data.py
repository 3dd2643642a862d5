"""train/data.py: sources, cleaning, the cached token file, the held-out split and the resumable block order."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from train import data as D
from train.config import DataConfig

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "train" / "data" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def tok():
    """A small BPE learned from the shipped corpus (fast; the cache logic does not care which tokenizer)."""
    from train.modeling import train_bpe_tokenizer
    return train_bpe_tokenizer(512, DataConfig(sources=[str(TINY)]))


def _cfg(tmp_path, sources, **kw):
    return DataConfig(sources=[str(s) for s in sources], cache_dir=str(tmp_path / "cache"), **kw)


# ----- cleaning -------------------------------------------------------------------------------------------------------
def test_gutenberg_clean_keeps_only_the_book_and_normalises_newlines():
    raw = ("The Project Gutenberg eBook of X\r\nLicence blah\r\n"
           "*** START OF THE PROJECT GUTENBERG EBOOK A VERY LONG\r\nTITLE ***\r\n"
           "Chapter 1\r\nIt was a dark night.\r\r\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nMore licence\r\n")
    out = D.gutenberg_clean(raw)
    assert out.startswith("Chapter 1\nIt was a dark night.")
    assert "Licence" not in out and "licence" not in out and "\r" not in out and "TITLE" not in out
    assert "END OF" not in out


def test_gutenberg_clean_without_markers_keeps_the_text():
    assert D.gutenberg_clean("Just a story.\r\nThe end.\r\n") == "Just a story.\nThe end.\n"


def test_gutenberg_clean_on_the_real_books(shared_data):
    path = shared_data / "gutenberg" / "11-0.txt.gz"
    if not path.is_file():
        pytest.skip("Alice not in ../shared/data/gutenberg")
    raw = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    out = D.gutenberg_clean(raw)
    assert "Project Gutenberg" in raw[:2000] and "Project Gutenberg" not in out[:5000]
    assert "Down the Rabbit-Hole" in out[:3000] and "*** END" not in out
    assert 0.8 * len(raw) < len(out) < len(raw)


# ----- sources and errors ---------------------------------------------------------------------------------------------
def test_source_errors_name_the_source(tmp_path):
    with pytest.raises(D.DataError, match="nope.txt"):
        D.expand_sources([str(tmp_path / "nope.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="empty"):
        D.expand_sources([str(tmp_path / "empty")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(D.DataError, match="unsupported"):
        D.expand_sources([str(tmp_path / "x.csv")])
    with pytest.raises(D.DataError, match="no data sources"):
        D.expand_sources([])


def test_empty_text_and_bad_jsonl_fail_clearly(tmp_path, tok):
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(D.DataError, match="no text found"):
        D.build_token_cache(_cfg(tmp_path, [tmp_path / "blank.txt"]), tok)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2.*text"):
        D.build_token_cache(_cfg(tmp_path, [tmp_path / "bad.jsonl"]), tok)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(D.DataError, match=r"broken.jsonl:1"):
        D.build_token_cache(_cfg(tmp_path, [tmp_path / "broken.jsonl"]), tok)


def test_hf_dataset_offline_gives_a_clear_error(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(D.DataError, match="max_tokens"):
        D.build_token_cache(_cfg(tmp_path, ["hf:someone/some-corpus"]), tok)
    with pytest.raises(D.DataError, match="network"):
        D.build_token_cache(_cfg(tmp_path, ["hf:someone/some-corpus"], max_tokens=1000), tok)


# ----- the token cache ------------------------------------------------------------------------------------------------
def test_documents_are_joined_with_eos_and_every_format_reads(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first document")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("second document")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    cfg = _cfg(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt.gz", tmp_path / "c.jsonl"],
               shuffle_documents=False, eval_fraction=0.0)
    cache = D.build_token_cache(cfg, tok)
    ids = cache.tokens().tolist()
    eos = tok.eos_token_id
    assert cache.n_documents == 4 and ids.count(eos) == 4 and ids[-1] == eos
    docs = tok.decode(ids).split(tok.eos_token)
    assert docs[:4] == ["first document", "second document", "third", "fourth"]
    assert cache.tokens().dtype == np.uint16  # small vocabulary -> 2 bytes per token


def test_cache_is_reused_and_not_retokenized(tmp_path, tok, monkeypatch):
    cfg = _cfg(tmp_path, [TINY])
    first = D.build_token_cache(cfg, tok)
    assert first.built

    def boom(*a, **k):
        raise AssertionError("re-tokenized although the cache exists")

    monkeypatch.setattr(D, "encode_document", boom)
    second = D.build_token_cache(cfg, tok)
    assert not second.built and second.directory == first.directory
    assert np.array_equal(second.tokens(), first.tokens())


def test_cache_key_changes_when_a_file_or_setting_changes(tmp_path, tok):
    f = tmp_path / "doc.txt"
    f.write_text("one two three " * 50)
    a = D.build_token_cache(_cfg(tmp_path, [f]), tok)
    b = D.build_token_cache(_cfg(tmp_path, [f], clean="gutenberg"), tok)
    assert b.built and b.directory != a.directory
    f.write_text("four five six " * 50)
    os.utime(f, ns=(1, 10**18))
    c = D.build_token_cache(_cfg(tmp_path, [f]), tok)
    assert c.built and c.directory != a.directory


def test_a_half_written_cache_is_never_used(tmp_path, tok):
    cfg = _cfg(tmp_path, [TINY])
    good = D.build_token_cache(cfg, tok)
    with open(good.directory / "tokens.bin", "r+b") as f:
        f.truncate(10)
    again = D.build_token_cache(cfg, tok)  # the size check fails: rebuilt, never read short
    assert again.built and again.n_tokens == good.n_tokens
    assert np.array_equal(again.tokens()[:100], D.build_token_cache(cfg, tok).tokens()[:100])


def test_held_out_split_falls_on_a_document_boundary(tmp_path, tok):
    for i in range(10):
        (tmp_path / f"d{i}.txt").write_text(f"document number {i}. " * 20)
    cache = D.build_token_cache(_cfg(tmp_path, [tmp_path], eval_fraction=0.2), tok)
    toks = cache.tokens()
    assert toks[cache.split - 1] == tok.eos_token_id           # train ends with a whole document
    held = cache.n_tokens - cache.split
    assert 0.1 * cache.n_tokens < held < 0.3 * cache.n_tokens
    assert tok.decode(cache.eval_tokens()[:20].tolist()).startswith("document number")


def test_explicit_eval_sources(tmp_path, tok):
    (tmp_path / "train.txt").write_text("alpha beta gamma " * 40)
    (tmp_path / "held.txt").write_text("delta epsilon " * 10)
    cache = D.build_token_cache(_cfg(tmp_path, [tmp_path / "train.txt"],
                                     eval_sources=[str(tmp_path / "held.txt")]), tok)
    assert "delta" in tok.decode(cache.eval_tokens().tolist())
    assert "delta" not in tok.decode(cache.train_tokens().tolist())


# ----- blocks and their order -----------------------------------------------------------------------------------------
def test_packed_blocks_cut_the_stream():
    tokens = np.arange(103, dtype=np.uint16)
    blocks = D.PackedBlocks(tokens, 10)
    assert len(blocks) == 10
    assert blocks.batch([3])["input_ids"].tolist() == [list(range(30, 40))]
    with pytest.raises(D.DataError, match="fewer than one block"):
        D.PackedBlocks(tokens[:5], 10, "eval")


def test_block_sampler_resumes_exactly_and_shards_ranks():
    ref = D.BlockSampler(13, seed=7)
    stream = [ref.next_indices(4) for _ in range(10)]      # crosses epoch boundaries
    resumed = D.BlockSampler(13, seed=7)
    resumed.load_state_dict(D.BlockSampler(13, seed=7).state_dict() | {"position": 4 * 6})
    assert [resumed.next_indices(4) for _ in range(4)] == stream[6:]
    skipped = D.BlockSampler(13, seed=7, start=4 * 6)      # data.skip_blocks: a continuation sees the order's rest
    assert [skipped.next_indices(4) for _ in range(4)] == stream[6:]
    epoch0 = sorted(sum(stream, [])[:13])
    assert epoch0 == list(range(13))                        # every block once per epoch
    r0, r1 = D.BlockSampler(13, 7, world_size=2, rank=0), D.BlockSampler(13, 7, world_size=2, rank=1)
    a, b = r0.next_indices(3), r1.next_indices(3)
    assert a + b == D.BlockSampler(13, 7).next_indices(6)   # the two ranks split one global batch
    assert r0.position == r1.position == 6
    with pytest.raises(ValueError, match="data changed"):
        D.BlockSampler(12, 7).load_state_dict(r0.state_dict())
