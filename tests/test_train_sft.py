"""train/sft.py: the prompt is never noised, padding follows the chosen mode, GSM8K records build canvases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train import sft as S
from train.config import DataConfig, SFTConfig

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
    b = S.sft_batch(ids, prompt_len, content_len, "ignore")       # cut after the longest content (9)
    assert b["input_ids"].shape == (2, 9) and torch.equal(b["input_ids"], ids[:, :9])
    assert b["maskable"][0].tolist() == [False] * 3 + [True] * 4 + [False] * 2
    assert b["attention_mask"][0].tolist() == [1] * 7 + [0] * 2 and b["attention_mask"][1].tolist() == [1] * 9


def test_ignored_padding_cut_changes_no_loss(tmp_path, tok):
    """padding=ignore cuts each batch after its longest record; padding that is neither attended to nor a target
    changes no loss: the AR objective (exact) and the diffusion ELBO at fixed t give the same value on the cut and
    on the full 128-token canvas."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import dlm
    from train.modeling import Objective
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=128))
    model = dlm.DiffusionLM(base, tok, dlm.DLMConfig(mask_token_id=tok.mask_token_id)).eval()
    data = DataConfig(sources=[str(_records(tmp_path, 8))], cache_dir=str(tmp_path / "cache"))
    arrays = S.build_sft_cache(data, SFTConfig(max_length=128, padding="ignore"), tok)
    ids = torch.from_numpy(arrays.ids[:4].astype("int64"))
    p = torch.from_numpy(arrays.prompt_len[:4].astype("int64"))
    c = torch.from_numpy(arrays.content_len[:4].astype("int64"))
    cut = S.sft_batch(ids, p, c, "ignore")
    assert cut["input_ids"].shape[1] == int(c.max()) < 128
    pos = torch.arange(128)[None]
    full = {"input_ids": ids, "maskable": (pos >= p[:, None]) & (pos < c[:, None]),
            "attention_mask": (pos < c[:, None]).long()}
    with torch.no_grad():
        ar = Objective(model, objective="ar")
        assert torch.allclose(ar(**cut)[0], ar(**full)[0], rtol=1e-5, atol=1e-6)
        # t = 1 masks every response token: the same noise on both shapes
        a = model.diffusion_loss(cut["input_ids"], t=torch.ones(4), maskable=cut["maskable"],
                                 attention_mask=cut["attention_mask"])
        b = model.diffusion_loss(full["input_ids"], t=torch.ones(4), maskable=full["maskable"],
                                 attention_mask=full["attention_mask"])
        assert torch.allclose(a.loss, b.loss, rtol=1e-5, atol=1e-6)


def test_gsm8k_symbolic_records(tmp_path, tok):
    """sft.record_format=gsm8k_symbolic: the response is only the <<...>> equations and #### answer."""
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "Tom has 3 bags of 4 apples and eats 2. How many are left?",
                                "answer": "He has 3*4 = <<3*4=12>>12 apples.\nThen 12-2 = <<12-2=10>>10.\n#### 10"})
                    + "\n")
    data = DataConfig(sources=[str(path)], cache_dir=str(tmp_path / "cache"))
    cfg = SFTConfig(max_length=128, record_format="gsm8k_symbolic", prompt_template="Question: {question}\nAnswer:",
                    response_template=" {answer}")
    arrays = S.build_sft_cache(data, cfg, tok)
    p, c = int(arrays.prompt_len[0]), int(arrays.content_len[0])
    response = tok.decode(arrays.ids[0, p: c - 1].tolist())
    assert response.replace(" ", "") == "<<3*4=12>><<12-2=10>>####10"
    plain = S.build_sft_cache(data, SFTConfig(max_length=128), tok)      # another cache entry, the full text
    assert "apples" in tok.decode(plain.ids[0, plain.prompt_len[0]: plain.content_len[0]].tolist())


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
