"""train.data.WeightedMixer and weighted data.sources: the DiffuLLaMA-style 70/30 mix really interleaved, by tokens,
deterministic for a seed, and resumable at any point with the same order."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train import data as D
from train.config import ConfigError, DataConfig, load_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "train" / "data" / "tiny_corpus.txt"


def _docs(source: int, n: int = 100_000):
    """Deterministic synthetic documents: source 0 short (20-59 tokens), source 1 long (200-399): a mixer that
    weighted documents instead of tokens would be far off the weights."""
    rng = np.random.default_rng(100 + source)
    lo, hi = ((20, 60), (200, 400))[source]
    for k in range(n):
        yield (source, k, int(rng.integers(lo, hi)))


def _open(i: int, skip: int):
    it = _docs(i)
    for _ in range(skip):
        next(it)
    return it


def _length(item) -> int:
    return item[2]


def _mixer(state=None, seed=7, weights=(0.7, 0.3)):
    return D.WeightedMixer(_open, weights, seed=seed, length=_length, state=state)


def _take(mixer, n):
    return [next(mixer) for _ in range(n)]


def test_token_shares_follow_the_weights():
    m = _mixer()
    items = _take(m, 6000)
    shares = m.shares()
    assert shares[0] == pytest.approx(0.7, abs=0.015) and shares[1] == pytest.approx(0.3, abs=0.015)
    docs0 = sum(1 for i, _ in items if i == 0) / len(items)
    assert docs0 > 0.9   # by documents the short source dominates: the weights are over tokens
    sources = [i for i, _ in items[:200]]
    assert 0 < sum(sources) < 200 and max(len(run) for run in "".join(map(str, sources)).split("0")) < 10  # mixed


def test_three_sources_and_unnormalised_weights():
    def open3(i, skip):
        return _open(i % 2, skip) if i < 2 else _open(0, skip)
    m = D.WeightedMixer(open3, [2, 1, 1], seed=0, length=_length)
    _take(m, 8000)
    assert m.weights == [0.5, 0.25, 0.25]
    assert m.shares() == pytest.approx([0.5, 0.25, 0.25], abs=0.02)


def test_same_seed_same_order_other_seed_other_order():
    assert _take(_mixer(seed=7), 500) == _take(_mixer(seed=7), 500)
    assert _take(_mixer(seed=8), 500) != _take(_mixer(seed=7), 500)


@pytest.mark.parametrize("cut", [0, 1, 137, 4096, 4097, 5000])
def test_resuming_mid_stream_gives_the_uninterrupted_sequence(cut):
    whole = _take(_mixer(), 6000)
    first = _mixer()
    head = _take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))   # what a checkpoint would store
    tail = _take(_mixer(state=state), 6000 - cut)
    assert head + tail == whole


def test_a_source_running_out_ends_the_mixture():
    def short(i, skip):
        it = iter([(i, k, 10) for k in range(5 if i == 1 else 1000)])
        for _ in range(skip):
            next(it)
        return it
    m = D.WeightedMixer(short, [0.5, 0.5], seed=0, length=_length)
    items = list(m)
    assert sum(1 for i, _ in items if i == 1) == 5 and len(items) < 1000


def test_bad_weights_and_state_are_refused():
    with pytest.raises(ValueError, match="positive"):
        D.WeightedMixer(_open, [0.7, 0.0])
    with pytest.raises(ValueError, match="state is for 3 sources"):
        D.WeightedMixer(_open, [0.7, 0.3], state={"draws": 0, "taken": [0, 0, 0], "tokens": [0, 0, 0]})


# ----- data.weights through the token cache ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from train.modeling import train_bpe_tokenizer
    return train_bpe_tokenizer(512, DataConfig(sources=[str(TINY)]))


def test_weighted_sources_are_interleaved_in_the_token_cache(tmp_path, tok):
    prose = tmp_path / "prose.jsonl"
    code = tmp_path / "code.jsonl"
    prose.write_text("".join(json.dumps({"text": f"the quiet river {k} runs past the old mill"}) + "\n"
                             for k in range(400)))
    code.write_text("".join(json.dumps({"text": f"def f{k}(x):\n    return x * {k} + 1\n"}) + "\n"
                            for k in range(400)))
    cfg = DataConfig(sources=[str(prose), str(code)], weights=[0.7, 0.3], cache_dir=str(tmp_path / "cache"),
                     eval_fraction=0.0, max_tokens=4000)
    cache = D.build_token_cache(cfg, tok)
    meta = json.loads((cache.directory / "meta.json").read_text())
    assert meta["mix"]["weights"] == [0.7, 0.3] and meta["mix"]["shares"][0] == pytest.approx(0.7, abs=0.06)
    assert sum(meta["mix"]["taken"]) == cache.n_documents and sum(meta["mix"]["tokens"]) == cache.n_tokens
    docs = tok.decode(cache.tokens().tolist()).split(tok.eos_token)[:-1]
    kinds = ["code" if d.startswith("def ") else "prose" for d in docs]
    assert "code" in kinds[:20] and "prose" in kinds[:20]               # interleaved, not one after the other
    assert D.build_token_cache(cfg, tok).directory == cache.directory    # reused
    plain = DataConfig(sources=[str(prose), str(code)], cache_dir=str(tmp_path / "cache"), eval_fraction=0.0,
                       max_tokens=4000)
    assert D.build_token_cache(plain, tok).directory != cache.directory   # weights are part of the cache key
    again = D.build_token_cache(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "other")}), tok)
    assert np.array_equal(again.tokens(), cache.tokens())               # same seed, same stream


@pytest.mark.parametrize("override, fragment", [
    ("data.weights=[0.7]", "data.weights: needs one weight per data.sources entry (2), got 1"),
    ("data.weights=[0.7,-0.3]", "data.weights: must be positive numbers"),
    ("data.weights=[0.7,.nan]", "data.weights: must be positive numbers"),
])
def test_config_validates_weights_naming_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config("diffullama-7b", [override])
