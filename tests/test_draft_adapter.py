"""The row-gated draft adapter (`dlm.adapter_routing`): the speculative decoder's verifier is the AR base itself.

- the clean rows of a block forward (and their cache) are the base model's, whatever the adapter learned;
- greedy speculative decoding writes the base's greedy text token for token;
- sampled speculative decoding writes the base's sampling distribution (a chi-square test that rejects a wrong
  verifier);
- a model directory with an any-order adapter and a draft adapter loads as one model with both modes;
- the draft objectives train the drafts toward acceptance.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dlm
from dlm.adapter_routing import ANY_ORDER, DRAFT, AdapterRouting
from dlm.draft_objectives import acceptance, expected_tokens_per_forward, reach_weights
from dlm.token_sampling import banned_token_ids, sampling_probs
from train.ship import ship_draft

PROMPT = "Once upon a time"


def _lora(model, seed: int = 0, scale: float = 0.3):
    """peft LoRA on every linear layer with random B (an adapter that changes the model), the mask row trainable."""
    from train.config import LoraConfigSection
    from train.modeling import add_lora
    add_lora(model, LoraConfigSection(enabled=True, r=4, alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.base.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def gated(tiny_llama_dir):
    """A tiny DLM whose one adapter is a row-gated draft adapter, and the same base without it."""
    model = _lora(dlm.load(tiny_llama_dir, device="cpu", dtype="float32"))
    model.routing = AdapterRouting(model.base, gated=ANY_ORDER)
    model.config.row_gated = True
    return model.eval(), dlm.load(tiny_llama_dir, device="cpu", dtype="float32").eval()


def _verify(model, prompt_ids, drafts, n_noisy=3):
    cache = model.new_block_cache()
    with torch.no_grad():
        model.block_commit(cache, prompt_ids[:, :-1])
        out = model.block_verify(cache, torch.full((1, n_noisy), model.mask_token_id), torch.cat(
            [prompt_ids[:, -1:], drafts], 1), clean_from=0, predict_after=True)
    return out, cache


@pytest.mark.numeric
def test_clean_rows_and_their_cache_are_the_base_model(gated):
    model, base = gated
    ids = torch.tensor([[5, 9, 13, 21, 34, 55]])
    drafts = torch.tensor([[8, 3]])
    (noisy, clean), cache = _verify(model, ids, drafts)
    (noisy_b, clean_b), cache_b = _verify(base, ids, drafts)
    torch.testing.assert_close(clean, clean_b, rtol=1e-5, atol=1e-5)               # the verifier is the base
    for layer, layer_b in zip(cache.kv.layers, cache_b.kv.layers):                   # so is the cache it leaves
        torch.testing.assert_close(layer.keys, layer_b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values, layer_b.values, rtol=1e-5, atol=1e-5)
    assert (noisy[:, 1:] - noisy_b[:, 1:]).abs().amax() > 1e-2                       # the drafts are the adapter's
    # the AR side of the model is the base too
    x = torch.tensor([[5, 9, 13, 21]])
    with torch.no_grad():
        torch.testing.assert_close(model.ar_logits(x)[..., :-1], base.ar_logits(x)[..., :-1], rtol=1e-5, atol=1e-5)


def test_trained_mask_row_stays_merged_around_peft_disable_adapter(gated):
    """The routing writes the draft adapter's trained [MASK] row into the embedding (unmerged, peft rebuilds the
    whole embedding every forward); peft's `disable_adapter()` context unmerges it, and the next forward merges it
    again instead of running unmerged from then on."""
    model, base = gated
    layers = model.routing.token_layers
    assert layers, "the fixture's adapter trains the mask row"
    ids = torch.tensor([[5, 9, 13, 21, 34, 55]])
    drafts = torch.tensor([[8, 3]])
    (noisy, clean), _ = _verify(model, ids, drafts)
    assert all(layer.merged for layer in layers)
    with model.base.disable_adapter():
        (noisy_off, clean_off), _ = _verify(model, ids, drafts)
        assert not any(layer.merged for layer in layers)
    (noisy_b, _), _ = _verify(base, ids, drafts)
    torch.testing.assert_close(noisy_off, noisy_b, rtol=1e-5, atol=1e-5)            # disabled: the base's drafts
    (noisy_again, clean_again), _ = _verify(model, ids, drafts)
    assert all(layer.merged for layer in layers)
    assert torch.equal(noisy_again, noisy) and torch.equal(clean_again, clean)
    with torch.no_grad():                                   # the AR mode (adapters off) and back: merged again
        model.ar_logits(ids)
    _verify(model, ids, drafts)
    assert all(layer.merged for layer in layers)


@pytest.mark.numeric
def test_ar_generate_of_the_dlm_is_the_base_model(gated):
    model, base = gated
    model.generate(PROMPT, decoder="speculative", block_length=2, max_new_tokens=4, temperature=0.0)  # adapter on
    for prompt in (PROMPT, "The cat"):
        got = model.ar_generate(prompt, max_new_tokens=8, temperature=0.0).token_ids
        assert got == base.ar_generate(prompt, max_new_tokens=8, temperature=0.0).token_ids


@pytest.mark.numeric
def test_greedy_speculative_output_is_the_base_models_greedy_text(gated):
    model, base = gated
    for block_length in (2, 4):
        for prompt in (PROMPT, "The cat", "She said that the"):
            spec = model.generate(prompt, max_new_tokens=12, decoder="speculative", block_length=block_length,
                                  temperature=0.0, suppress_eos=True)
            ar = base.ar_generate(prompt, max_new_tokens=12, temperature=0.0, suppress_eos=True)
            assert spec.token_ids == ar.token_ids
            assert spec.nfe <= len(ar.token_ids)


def _pair_distribution(base, prompt_ids, temperature, top_k):
    """The AR base's exact joint distribution of the next two tokens under the warpers: {(x, y): p}."""
    def probs(ids):
        with torch.no_grad():
            logits = base.ar_logits(torch.tensor([ids]))[0, -1:].float()
        logits[:, banned_token_ids(base, suppress_eos=True)] = float("-inf")   # as the decoders do
        return sampling_probs(logits, temperature, top_k)[0]
    joint = {}
    p1 = probs(prompt_ids)
    for x in torch.nonzero(p1).flatten().tolist():
        p2 = probs(prompt_ids + [x])
        for y in torch.nonzero(p2).flatten().tolist():
            joint[(x, y)] = float(p1[x] * p2[y])
    return joint


def _chi2_pvalue(counts: dict, joint: dict, n: int) -> float:
    from scipy.stats import chisquare
    cells = sorted(joint)
    observed = [counts.get(c, 0) for c in cells]
    assert sum(observed) == n, "a sample outside the AR support"
    total = sum(joint[c] for c in cells)
    expected = [joint[c] / total * n for c in cells]
    return float(chisquare(observed, expected).pvalue)


@pytest.mark.slow
def test_sampled_speculative_output_is_distributed_as_the_base_models_sampling(gated, monkeypatch):
    """At T > 0 the first two written tokens (the second one drafted by the adapter, verified by the base) follow
    the base's joint distribution; the same test rejects a verifier that keeps every draft."""
    from dlm.decoders import speculative
    model, base = gated
    ids = model.tokenizer(PROMPT)["input_ids"]
    temperature, top_k, n = 1.0, 3, 600
    joint = _pair_distribution(base, ids, temperature, top_k)

    def sample(seed0: int) -> dict:
        counts = {}
        for i in range(n):
            g = model.generate(PROMPT, max_new_tokens=2, decoder="speculative", block_length=2,
                               temperature=temperature, top_k=top_k, suppress_eos=True, seed=seed0 + i)
            key = tuple(g.token_ids[:2])
            counts[key] = counts.get(key, 0) + 1
        return counts

    assert _chi2_pvalue(sample(0), joint, n) > 1e-3
    monkeypatch.setattr(speculative, "_accepts", lambda run, draft, p: True)    # a wrong verifier: keep all
    wrong = sample(0)
    assert sum(wrong.get(c, 0) for c in joint) < n or _chi2_pvalue(wrong, joint, n) < 1e-3


def _adapter_dir(model, directory: Path) -> Path:
    """Save a LoRA'd tiny model as an adapter-only DLM directory over its base."""
    model.save_pretrained(directory, base_model=str(model.source))
    return directory


def test_one_directory_two_adapters_both_modes(tiny_llama_dir, tmp_path):
    """An adapter-only DLM with a draft adapter beside it loads as one model: full attention runs the any-order
    adapter on every row (as that adapter alone), block forwards run the draft adapter on the noisy rows only,
    and the clean rows / the AR side are the base."""
    any_order = _lora(dlm.load(tiny_llama_dir, device="cpu", dtype="float32"), seed=1)
    any_order.source = str(tiny_llama_dir)
    root = _adapter_dir(any_order, tmp_path / "dlm")
    draft = _lora(dlm.load(tiny_llama_dir, device="cpu", dtype="float32"), seed=2)
    draft.source = str(tiny_llama_dir)
    draft.config.row_gated = True
    _adapter_dir(draft, tmp_path / "draft-export")
    with pytest.raises(ValueError, match="row-gated"):
        ship_draft(root, root, dtype="float32")            # an export that is not a draft adapter is refused
    ship_draft(tmp_path / "draft-export", root, dtype="float32")
    cfg = json.loads((root / "dlm_config.json").read_text())
    assert cfg["draft_adapter"] == "draft" and (root / "draft" / "adapter_model.safetensors").is_file()

    both = dlm.load(root, device="cpu", dtype="float32")
    alone = dlm.load(root, device="cpu", dtype="float32", draft_adapter=False)
    base = dlm.load(tiny_llama_dir, device="cpu", dtype="float32")
    assert both.routing is not None and alone.routing is None
    assert set(both.base.peft_config) == {ANY_ORDER, DRAFT}
    canvas = torch.tensor([[5, 9, 13, both.mask_token_id, both.mask_token_id, 40, 41]])
    with torch.no_grad():
        torch.testing.assert_close(both.denoise_logits(canvas), alone.denoise_logits(canvas), rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[5, 9, 13, 21, 34]])
    (_, clean), _ = _verify(both, ids, torch.tensor([[8]]))
    (_, clean_b), _ = _verify(base, ids, torch.tensor([[8]]))
    torch.testing.assert_close(clean, clean_b, rtol=1e-5, atol=1e-5)
    # after a block forward, full attention is still the any-order adapter
    with torch.no_grad():
        torch.testing.assert_close(both.denoise_logits(canvas), alone.denoise_logits(canvas), rtol=1e-4, atol=1e-4)
    spec = both.generate(PROMPT, max_new_tokens=8, decoder="speculative", block_length=3, suppress_eos=True)
    assert spec.token_ids == base.ar_generate(PROMPT, max_new_tokens=8, suppress_eos=True).token_ids
    # a draft directory outside the model directory is refused with the field named
    (root / "dlm_config.json").write_text(json.dumps({**cfg, "draft_adapter": "../draft-export"}))
    with pytest.raises(dlm.LoadError, match="draft_adapter"):
        dlm.load(root, device="cpu", dtype="float32")


def test_reach_weights_are_the_chance_to_be_reached():
    alpha = torch.tensor([[1.0, 0.5, 0.5, 0.5, 1.0, 0.2, 0.5]])
    block = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    want = torch.tensor([[1.0, 1.0, 0.5, 0.25, 1.0, 1.0, 0.2]])
    torch.testing.assert_close(reach_weights(alpha, block), want)


def test_acceptance_is_one_minus_total_variation():
    p = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    q = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    pp, qq = p.softmax(-1), q.softmax(-1)
    torch.testing.assert_close(acceptance(p, q), 1 - 0.5 * (pp - qq).abs().sum(-1))
    assert float(acceptance(p, p)) == pytest.approx(1.0)
    assert float(acceptance(p, q, 0.0)) == 0.0 and float(acceptance(p, p, 0.0)) == 1.0


@pytest.mark.parametrize("kind", ["kd", "accept", "kd+accept"])
def test_draft_objectives_raise_acceptance(gated, kind):
    """A few steps of each objective on one batch raise the expected tokens per forward the base would accept,
    and leave the clean rows (the verifier) the base's."""
    model, base = gated
    model.train()
    x = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    before = expected_tokens_per_forward(model, x, 4, temperature=1.0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(25):
        out = model.block_diffusion_loss(x, 4, offset=0, draft_loss=kind, reach=True, full_mask=1.0,
                                         accept_temperature=1.0, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    after = expected_tokens_per_forward(model, x, 4, temperature=1.0)
    assert after["tpf"] > before["tpf"] + 0.05, (before, after)
    with torch.no_grad():
        torch.testing.assert_close(model.ar_logits(x)[..., :-1], base.ar_logits(x)[..., :-1], rtol=1e-5, atol=1e-5)


def test_a_row_gated_training_run_exports_a_draft_adapter(tmp_path):
    """`lora.row_gate` trains a draft adapter with the acceptance objective; its export loads with routing and
    speculative decoding through it writes the base's greedy text."""
    from train.config import load_config
    from train.loop import train
    corpus = Path(__file__).resolve().parents[1] / "train" / "data" / "tiny_corpus.txt"
    cfg = load_config("tiny-cpu", ["lora.enabled=true",
                                   "lora.r=4", "lora.alpha=8", "lora.row_gate=true", "diffusion.attention=blocks",
                                   "diffusion.block_lengths=[4]", "diffusion.draft_loss=kd+accept",
                                   "diffusion.reach=true", "diffusion.full_mask=0.5", f"data.sources=[{corpus}]",
                                   f"run.output_dir={tmp_path / 'run'}", "run.max_steps=3", "run.save_every=0",
                                   "run.eval_every=0", f"data.cache_dir={tmp_path / 'tokens'}"])
    train(cfg)
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "dlm_config.json").read_text())
    assert saved["row_gated"] and saved["training"]["draft_loss"] == "kd+accept"
    model = dlm.load(final, device="cpu", dtype="float32")
    assert model.routing is not None
    base = dlm.load(saved["base_model"], device="cpu", dtype="float32")
    spec = model.generate(PROMPT, max_new_tokens=8, decoder="speculative", block_length=4, suppress_eos=True)
    assert spec.token_ids == base.ar_generate(PROMPT, max_new_tokens=8, suppress_eos=True).token_ids
