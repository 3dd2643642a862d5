"""The lean decoder layers (`dlm.lean_layers`): packed LLaMA-style layers in two C++ calls compute transformers' layer
within fp32 rounding (their glue runs row by row in plain loops), every position's result is the same bits however
its row is batched (an AR step, a prefill, a verify forward beside noisy rows), so a row-gated adapter's clean rows
are the base's lean result exactly; the LoRA rows are within the adapter's int8 rounding, and every case the lean
layers do not handle falls back to transformers' forward."""
from __future__ import annotations

import pytest
import torch

import dlm
from dlm import lean_layers, packed_linear
from dlm.adapter_routing import ANY_ORDER, AdapterRouting, install_inference_forward

# lean vs transformers' layers on the same packed weights: the norm's sum of squares and the exp in silu are summed /
# rounded differently (a few ulps), and a later layer's int8 rows may round an activation so moved to its
# neighbouring step (1/127 of its block's largest, carried on)
LEAN_TOL = 1e-2
# LoRA rows, lean vs peft's fp32 adapter: the lean ops run A and B as packed int8 on int8 rows (~1% of the adapter's
# update), and the same rounding steps as above
DRAFT_TOL = 3e-2

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="the packed CPU kernel cannot be built here")


def _load(directory, fmt, lean: bool, monkeypatch):
    monkeypatch.setenv("DLM_LEAN_LAYERS", "on" if lean else "off")
    return dlm.load(directory, device="cpu", dtype="float32", quantization=fmt).eval()


def _n_lean(model) -> int:
    return sum(getattr(layer, "_dlm_lean", False) for layer in lean_layers.decoder_layers(model.base))


def _cached_run(model, ids, steps=4):
    """Prefill, then 1-row cached steps on greedy tokens; every step's logits and the final cache."""
    out_logits = []
    with torch.no_grad():
        out = model.base(input_ids=ids, use_cache=True)
        cache = out.cache
        out_logits.append(out.logits)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model.base(input_ids=nxt, cache=cache, use_cache=True)
            out_logits.append(out.logits)
            nxt = out.logits[:, -1:].argmax(-1)
    return out_logits, cache


@pytest.mark.numeric
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_lean_layers_match_transformers_and_rows_are_batch_independent(family_dir, family, fmt, monkeypatch):
    directory = family_dir(family)
    lean, ref = _load(directory, fmt, True, monkeypatch), _load(directory, fmt, False, monkeypatch)
    n_layers = lean.base.config.num_hidden_layers
    assert _n_lean(lean) == n_layers and _n_lean(ref) == 0
    ids = torch.tensor([[5, 9, 13, 21, 34, 55, 8]])
    got, cache = _cached_run(lean, ids)
    want, cache_ref = _cached_run(ref, ids)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=LEAN_TOL, atol=LEAN_TOL)
    for layer, layer_ref in zip(cache.layers, cache_ref.layers):
        torch.testing.assert_close(layer.keys, layer_ref.keys, rtol=LEAN_TOL, atol=LEAN_TOL)
        torch.testing.assert_close(layer.values, layer_ref.values, rtol=LEAN_TOL, atol=LEAN_TOL)
    # every cached 1-row step is the same bits as that position's row of one forward over the whole sequence
    seq = torch.cat([ids, torch.stack([g[:, -1].argmax(-1) for g in got[:-1]], 1)], 1)
    with torch.no_grad():
        whole = lean.base(input_ids=seq).logits
    assert torch.equal(whole[:, :ids.shape[1]], got[0])
    for i, step in enumerate(got[1:]):
        assert torch.equal(whole[:, ids.shape[1] + i], step[:, 0])
    # a block forward: several rows under a custom mask (the block decoders' call), and a batch with padding
    mask = lean.mask_token_id
    noisy = torch.tensor([[mask, 7, mask]])
    outs = []
    for model in (lean, ref):
        c = model.new_block_cache()
        with torch.no_grad():
            model.block_commit(c, ids[:, :-1])
            outs.append(model.block_verify(c, noisy, ids[:, -1:], clean_from=0, predict_after=True))
    torch.testing.assert_close(outs[0].noisy, outs[1].noisy, rtol=LEAN_TOL, atol=LEAN_TOL)
    torch.testing.assert_close(outs[0].clean, outs[1].clean, rtol=LEAN_TOL, atol=LEAN_TOL)
    assert torch.equal(outs[0].clean[:, -1], got[0][:, -1])        # the clean row beside noisy ones: the AR step
    batch = torch.tensor([[0, 0, 5, 9, 13], [4, 6, 8, 10, 12]])
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(lean.ar_logits(batch, attn), ref.ar_logits(batch, attn), rtol=LEAN_TOL,
                                   atol=LEAN_TOL)


def _gated_pair(directory, fmt, monkeypatch):
    """A packed tiny DLM with a row-gated LoRA draft adapter on every linear, with and without lean layers."""
    from tests.test_draft_adapter import _lora
    models = []
    for lean in (True, False):
        torch.manual_seed(0)   # peft draws A at random: the same adapter in both
        model = _lora(_load(directory, None, False, monkeypatch))
        model.routing = AdapterRouting(model.base, gated=ANY_ORDER)
        model.config.row_gated = True
        packed_linear.quantize_model(model.base, fmt)
        install_inference_forward(model.base, model.routing)
        monkeypatch.setenv("DLM_LEAN_LAYERS", "on" if lean else "off")
        lean_layers.install(model.base, model.routing)
        models.append(model.eval())
    return models


@pytest.mark.numeric
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_row_gated_lora_clean_rows_exact_draft_rows_close(tiny_llama_dir, fmt, monkeypatch):
    lean, ref = _gated_pair(tiny_llama_dir, fmt, monkeypatch)
    assert _n_lean(lean) == lean.base.config.num_hidden_layers and _n_lean(ref) == 0
    ids = torch.tensor([[5, 9, 13, 21, 34, 55]])
    results = []
    for model in (lean, ref):
        cache = model.new_block_cache()
        with torch.no_grad():
            model.block_commit(cache, ids[:, :-2])
            out = model.block_verify(cache, torch.full((1, 3), model.mask_token_id), ids[:, -2:], clean_from=0,
                                     predict_after=True)
        results.append((out, cache))
    (out, cache), (out_ref, cache_ref) = results
    with torch.no_grad():                                # the base's own rows: one plain forward over the sequence
        base_only = lean.block_verify(lean.new_block_cache(), None, ids, clean_from=0).clean
    assert torch.equal(out.clean, base_only[:, -2:])                      # the verifier: the base, exactly
    torch.testing.assert_close(out.clean, out_ref.clean, rtol=LEAN_TOL, atol=LEAN_TOL)
    for layer, layer_ref in zip(cache.kv.layers, cache_ref.kv.layers):
        torch.testing.assert_close(layer.keys, layer_ref.keys, rtol=LEAN_TOL, atol=LEAN_TOL)
        torch.testing.assert_close(layer.values, layer_ref.values, rtol=LEAN_TOL, atol=LEAN_TOL)
    # the drafts: the adapter's, as packed int8 (DRAFT_TOL)
    torch.testing.assert_close(out.noisy, out_ref.noisy, rtol=DRAFT_TOL, atol=DRAFT_TOL)
    assert not torch.allclose(out.noisy[:, 1:], base_only[:, :3], atol=1e-2)   # and the adapter does change them
    # the any-order mode: the adapter on every row
    with torch.no_grad():
        full, full_ref = lean.denoise_logits(ids), ref.denoise_logits(ids)
    torch.testing.assert_close(full, full_ref, rtol=DRAFT_TOL, atol=DRAFT_TOL)


@pytest.mark.numeric
def test_a_changed_adapter_is_seen_and_unhandled_cases_fall_back(tiny_llama_dir, monkeypatch):
    lean, ref = _gated_pair(tiny_llama_dir, "int4", monkeypatch)
    ids = torch.tensor([[5, 9, 13, 21, 34, 55]])
    with torch.no_grad():
        for model in (lean, ref):   # the adapter's weights updated in place (an optimizer step)
            for name, p in model.base.named_parameters():
                if "lora_A" in name:
                    p.mul_(1.5)
        torch.testing.assert_close(lean.denoise_logits(ids), ref.denoise_logits(ids), rtol=DRAFT_TOL, atol=DRAFT_TOL)
    # gradients: transformers' forward (the lean ops have no backward), and they reach the adapter
    lean.base.train()
    loss = lean.denoise_logits(ids).logsumexp(-1).sum()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lean.base.named_parameters() if "lora" in n)
    lean.base.eval()
    # a hook on an attention module (recording attention weights) takes transformers' forward, where it fires
    seen = []
    handle = lean_layers.decoder_layers(lean.base)[0].self_attn.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(lean.denoise_logits(ids), ref.denoise_logits(ids), rtol=DRAFT_TOL, atol=DRAFT_TOL)
    handle.remove()
    assert seen


def test_unpacked_and_other_families_keep_transformers_layers(family_dir, monkeypatch):
    monkeypatch.setenv("DLM_LEAN_LAYERS", "on")
    assert _n_lean(dlm.load(family_dir("llama"), device="cpu", dtype="float32")) == 0     # fp32: not packed
    assert _n_lean(dlm.load(family_dir("gpt2"), device="cpu", dtype="float32", quantization="int4")) == 0
