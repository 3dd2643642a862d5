"""dlm.load / save_pretrained: every accepted format, round-trips, adapters, and clear errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dlm
from dlm.loading import LoadError


def _logits(model, n=10):
    x = torch.arange(200, 200 + n)[None]
    with torch.no_grad():
        return model.denoise_logits(x)


def test_wrapper_and_plain_layouts_give_equal_logits(tiny_gpt2_dir, wrapper_gpt2_dir):
    wrapper = wrapper_gpt2_dir
    assert not any(k.startswith("transformer.") for k in load_file(str(wrapper / "model.safetensors")))
    a = dlm.load(tiny_gpt2_dir, device="cpu", mask_token_id=7)
    b = dlm.load(wrapper, device="cpu", mask_token_id=7)
    torch.testing.assert_close(_logits(a), _logits(b))


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_save_load_round_trip_is_exact(which, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    src = tiny_llama_dir if which == "llama" else tiny_gpt2_dir
    m = dlm.load(src, device="cpu")
    assert m.config.added_mask_token and m.mask_token_id == len(m.tokenizer) - 1
    m.config.ar_counterpart = "smollm2-135m"
    m.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    assert not list((tmp_path / "saved").glob("*.bin"))
    r = dlm.load(tmp_path / "saved", device="cpu")
    assert r.mask_token_id == m.mask_token_id and r.shift == m.shift
    assert r.ar_counterpart == "smollm2-135m" and r.config.added_mask_token
    assert torch.equal(_logits(m), _logits(r))


def test_shift_flag_round_trips(tiny_llama_dir, tmp_path):
    m = dlm.load(tiny_llama_dir, device="cpu", shift=False)
    m.save_pretrained(tmp_path / "noshift")
    assert dlm.load(tmp_path / "noshift", device="cpu").shift is False


def test_new_mask_row_is_deterministic(tiny_llama_dir):
    a, b = dlm.load(tiny_llama_dir, device="cpu"), dlm.load(tiny_llama_dir, device="cpu")
    assert torch.equal(a.base.get_input_embeddings().weight, b.base.get_input_embeddings().weight)


def test_explicit_mask_id_wins_and_is_validated(tiny_llama_dir):
    m = dlm.load(tiny_llama_dir, device="cpu", mask_token_id=811)
    assert m.mask_token_id == 811 and not m.config.added_mask_token
    with pytest.raises(LoadError, match="outside the vocabulary"):
        dlm.load(tiny_llama_dir, device="cpu", mask_token_id=10**7)


def test_lora_adapter_save_and_load(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    m = dlm.load(tiny_llama_dir, device="cpu")
    m.base = get_peft_model(m.base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    expected = _logits(m)
    m.save_pretrained(tmp_path / "adapter", base_model=str(tiny_llama_dir))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "config.json").exists()
    r = dlm.load(tmp_path / "adapter", device="cpu")
    torch.testing.assert_close(_logits(r), expected, atol=1e-5, rtol=1e-5)
    # the same adapter passed explicitly over the base
    r2 = dlm.load(tiny_llama_dir, device="cpu", adapter=tmp_path / "adapter")
    torch.testing.assert_close(_logits(r2), expected, atol=1e-5, rtol=1e-5)


def test_denoise_model_prefixed_adapter_is_remapped(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    m = dlm.load(tiny_llama_dir, device="cpu", mask_token_id=5)
    m.base = get_peft_model(m.base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                               init_lora_weights=False))
    expected = _logits(m)
    m.base.save_pretrained(tmp_path / "orig")
    w = tmp_path / "orig" / "adapter_model.safetensors"
    state = load_file(str(w))
    save_file({k.replace("base_model.model.", "base_model.model.denoise_model."): v for k, v in state.items()}, str(w))
    assert all("denoise_model." in k for k in load_file(str(w)))
    r = dlm.load(tiny_llama_dir, device="cpu", mask_token_id=5, adapter=tmp_path / "orig")
    torch.testing.assert_close(_logits(r), expected, atol=1e-5, rtol=1e-5)


def test_errors_are_clear(tiny_llama_dir, tmp_path):
    with pytest.raises(LoadError, match="unknown model"):
        dlm.load("no-such-model", device="cpu")
    with pytest.raises(LoadError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        dlm.load(tmp_path / "empty", device="cpu")
    # truncated safetensors
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(LoadError, match="corrupt or truncated"):
        dlm.load(bad, device="cpu")
    # shape mismatch: config says a bigger hidden size than the weights
    mism = tmp_path / "mismatch"
    shutil.copytree(tiny_llama_dir, mism)
    cfg = json.loads((mism / "config.json").read_text())
    cfg["hidden_size"] = 128
    (mism / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="could not load weights"):
        dlm.load(mism, device="cpu")
    # unsupported architecture
    arch = tmp_path / "arch"
    shutil.copytree(tiny_llama_dir, arch)
    cfg = json.loads((arch / "config.json").read_text())
    cfg["model_type"] = "bert"
    (arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="supported: gpt2, llama"):
        dlm.load(arch, device="cpu")
    # pickled weights are refused
    pick = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, pick)
    (pick / "model.safetensors").unlink()
    torch.save({}, pick / "pytorch_model.bin")
    with pytest.raises(LoadError, match="allow_pickle"):
        dlm.load(pick, device="cpu")
    with pytest.raises(LoadError, match="unknown dtype"):
        dlm.load(tiny_llama_dir, device="cpu", dtype="float13")
    with pytest.raises(LoadError, match="quantization must be"):
        dlm.load(tiny_llama_dir, device="cpu", quantization="3bit")
    # hub entries need the network: a clear error, not a traceback from deep inside huggingface_hub
    with pytest.raises(LoadError, match="Hugging Face hub"):
        dlm.load("diffugpt-s", device="cpu")


def test_real_smollm2_gguf_is_bidirectional_and_causal_at_r0(smollm2):
    tok = smollm2.tokenizer
    assert smollm2.config.base_family == "llama" and smollm2.ar_counterpart == "smollm2-135m"
    x = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    x2 = x.clone()
    x2[0, -2] = tok(" cat").input_ids[-1]
    with torch.no_grad():
        base = smollm2.base(x).logits
        causal = smollm2.denoise_logits(x, attention_mask_ratio=0.0)
        a, b = smollm2.denoise_logits(x), smollm2.denoise_logits(x2)
    assert torch.equal(causal[:, 1:], base[:, :-1])
    assert (a[0, 1:-2] - b[0, 1:-2]).abs().amax() > 1e-3
    # the AR view of the same weights predicts well-formed English
    nxt = smollm2.ar_logits(tok("The capital of France is", return_tensors="pt").input_ids)[0, -1]
    assert tok.decode(nxt.argmax()).strip() in {"Paris", "the", "a"}
