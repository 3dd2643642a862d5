"""train/sft.py: the prompt is never noised, padding follows the chosen mode, GSM8K records build canvases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.config import DataConfig, SFTConfig
from train import sft as S

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from train.modeling import train_bpe_tokenizer
    return train_bpe_tokenizer(512, DataConfig(sources=[str(REPO / "train" / "data" / "tiny_corpus.txt")]))


def _records(tmp_path, n=12):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"How many apples are {i} plus {i}?",
                                "answer": f"There are {i} and {i} apples, so {2 * i}.\n#### {2 * i}"}) + "\n")
    return path


def test_sft_batch_masks_only_the_response():
    ids = torch.arange(20).view(2, 10)
    prompt_len, content_len = torch.tensor([3, 5]), torch.tensor([7, 9])
    for padding in ("pad", "eos"):
        b = S.sft_batch(ids, prompt_len, content_len, padding)
        assert b["maskable"][0].tolist() == [False] * 3 + [True] * 7        # padding is a target
        assert b["maskable"][1].tolist() == [False] * 5 + [True] * 5
        assert b["attention_mask"] is None
    b = S.sft_batch(ids, prompt_len, content_len, "ignore")
    assert b["maskable"][0].tolist() == [False] * 3 + [True] * 4 + [False] * 3
    assert b["attention_mask"][1].tolist() == [1] * 9 + [0]


def test_cached_canvases_and_padding_modes(tmp_path, tok):
    data = DataConfig(sources=[str(_records(tmp_path))], cache_dir=str(tmp_path / "cache"))
    arrays = S.build_sft_cache(data, SFTConfig(max_length=128, padding="pad", pad_token_id=1), tok)
    assert arrays.built
    eos = tok.eos_token_id
    for row, p, c in zip(arrays.ids, arrays.prompt_len, arrays.content_len):
        assert 0 < p < c < 128 and row[c - 1] == eos and (row[c:] == 1).all()
        assert tok.decode(row[:p].tolist()).startswith("Question: How many apples")
    again = S.build_sft_cache(data, SFTConfig(max_length=128, padding="pad", pad_token_id=1), tok)
    assert not again.built                                                 # reused
    eos_pad = S.build_sft_cache(data, SFTConfig(max_length=128, padding="eos"), tok)
    c = int(eos_pad.content_len[0])
    assert (eos_pad.ids[0, c:] == eos).all()


def test_truncation_keeps_the_answer_start_and_the_prompt_end(tok):
    p, r = S.encode_pair(tok, "word " * 100, "answer " * 100, 32, chat_template=False)
    assert len(p) + len(r) == 32 and len(p) == 16
    assert tok.decode(r).startswith("answer")


def test_missing_template_field_is_named(tmp_path, tok):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"q": "hi", "answer": "yo"}) + "\n")
    with pytest.raises(Exception, match=r"x.jsonl:1.*question"):
        S.build_sft_cache(DataConfig(sources=[str(path)], cache_dir=str(tmp_path / "c")), SFTConfig(), tok)


def test_held_out_split(tmp_path, tok):
    data = DataConfig(sources=[str(_records(tmp_path, 20))], cache_dir=str(tmp_path / "cache"))
    arrays = S.build_sft_cache(data, SFTConfig(max_length=48), tok)
    train, held = S.split_sft(arrays, 0.25, seed=0, padding="pad")
    assert len(train) == 15 and len(held) == 5
    assert not set(train.indices) & set(held.indices)


def test_sft_loss_never_noises_the_prompt(tmp_path, tok, monkeypatch):
    """End to end through the training objective: x_t handed to the denoiser keeps every prompt token, at every
    noise level including t = 1, while response tokens do get masked."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import dlm
    from train.modeling import Objective
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=128))
    model = dlm.DiffusionLM(base, tok, dlm.DLMConfig(mask_token_id=tok.mask_token_id))
    data = DataConfig(sources=[str(_records(tmp_path, 16))], cache_dir=str(tmp_path / "cache"))
    arrays = S.build_sft_cache(data, SFTConfig(max_length=48), tok)
    train, _ = S.split_sft(arrays, 0.0, seed=0, padding="pad")
    batch = train.batch(list(range(8)))
    seen = []
    real = model.denoise_logits

    def spy(x_t, *a, **k):
        seen.append(x_t.clone())
        return real(x_t, *a, **k)

    monkeypatch.setattr(model, "denoise_logits", spy)
    objective = Objective(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        objective(**batch, generator=g)
    model.diffusion_loss(batch["input_ids"], t=torch.ones(8), maskable=batch["maskable"])
    prompt = ~batch["maskable"]
    masked_response = 0
    for x_t in seen:
        assert torch.equal(x_t[prompt], batch["input_ids"][prompt])
        masked_response += int((x_t[batch["maskable"]] == tok.mask_token_id).sum())
    assert masked_response > 0
    assert (seen[-1][batch["maskable"]] == tok.mask_token_id).all()   # t = 1: the whole response masked


def test_gsm8k_recipe_builds(shared_data, tmp_path):
    path = shared_data / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip("gsm8k train.jsonl absent")
    from train.modeling import train_bpe_tokenizer
    data = DataConfig(sources=[str(path)], cache_dir=str(tmp_path / "cache"), max_documents=32)
    tok = train_bpe_tokenizer(400, DataConfig(sources=[str(REPO / "train" / "data" / "tiny_corpus.txt")]))
    arrays = S.build_sft_cache(data, SFTConfig(max_length=256), tok)
    assert len(arrays.ids) == 32
    text = tok.decode(arrays.ids[0, : arrays.content_len[0]].tolist())
    assert text.startswith("Question: ") and "####" in text
